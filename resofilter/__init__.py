"""resofilter: ResoFilter-style data filtering for LLM fine-tuning."""

from resofilter.errors import ConfigError, DataError, ResoFilterError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ResoFilterError", "__version__"]
