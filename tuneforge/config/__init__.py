"""Config: a typed schema (one section per concern), YAML loading and dotted `key.sub=value` overrides."""

from tuneforge.config.load import load_config, parse_overrides
from tuneforge.config.schema import RunConfig

__all__ = ["RunConfig", "load_config", "parse_overrides"]
