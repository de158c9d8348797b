"""The data formats registry: name -> format (one module each: validate a row, render it), and
the file types a row is read from (qlorax.formats.files).

A new format is one module here (a class with the `DataFormat` interface and a `FORMAT`
instance) and one entry in `FORMATS`; the config (`data.format`), the CLI help and
`qlorax config import` learn the name from `FORMAT_NAMES`. No torch and nothing above the
foundation layer is imported here, so the config can import it."""

from __future__ import annotations

from qlorax.errors import ConfigError
from qlorax.formats.alpaca import FORMAT as ALPACA
from qlorax.formats.base import DataFormat, Segment, encode, type_name, wraps_in_bos_eos
from qlorax.formats.chat import FORMAT as CHAT
from qlorax.formats.files import FILE_TYPES
from qlorax.formats.prompt_completion import FORMAT as PROMPT_COMPLETION
from qlorax.formats.raw import FORMAT as RAW
from qlorax.formats.sharegpt import FORMAT as SHAREGPT

FORMATS: dict[str, DataFormat] = {fmt.name: fmt for fmt in (ALPACA, CHAT, RAW, SHAREGPT, PROMPT_COMPLETION)}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
DEFAULT_FORMAT = ALPACA.name

__all__ = ["DEFAULT_FORMAT", "FILE_TYPES", "FORMATS", "FORMAT_NAMES", "DataFormat", "Segment", "data_format",
           "encode", "type_name", "wraps_in_bos_eos"]


def data_format(name: str) -> DataFormat:
    """The registered format `name` (the config has already checked it; this names it if not)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"data.format {name!r}: expected one of {', '.join(FORMAT_NAMES)}") from None
