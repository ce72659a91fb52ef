"""Text for calibration and evaluation (`text`, with the offline readers `austen` and `debian`)
and the token windows cut from it (`windows`)."""

from omniquant.data.austen import AUSTEN_NOVELS, AUSTEN_RDB, AUSTEN_SHA256, read_austen
from omniquant.data.debian import DEBIAN_DOCS, read_debian_doc
from omniquant.data.text import load_text
from omniquant.data.windows import bos_token_id, calibration_windows, eval_windows, tokenize_text
from omniquant.errors import DataError

__all__ = [
    "AUSTEN_NOVELS",
    "AUSTEN_RDB",
    "AUSTEN_SHA256",
    "DEBIAN_DOCS",
    "DataError",
    "bos_token_id",
    "calibration_windows",
    "eval_windows",
    "load_text",
    "read_austen",
    "read_debian_doc",
    "tokenize_text",
]
