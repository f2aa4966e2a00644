"""Data: typed records, readers with file:line errors, chat rendering to (input_ids, loss_mask), collation."""
