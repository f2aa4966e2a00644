"""Models: load a HF folder, a GGUF file, an embedded default or a hub id; heads; tiny test models."""
