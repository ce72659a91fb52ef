"""The Jane Austen corpus of the austen-v1 benchmark, read without R.

Debian's ``r-cran-janeaustenr`` installs the six novels as an R lazy-load database
(``Rdata.rdb`` + ``Rdata.rdx``): a sequence of records, each a 4-byte big-endian length and a
compressed stream holding one R object serialized in XDR format. This module holds a minimal
reader of that format (enough for character vectors) and `read_austen`, which checks each
novel's sha256 against BENCHMARK.md.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import logging
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from omniquant.errors import DataError

logger = logging.getLogger(__name__)

AUSTEN_RDB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
"""Where Debian's ``r-cran-janeaustenr`` installs its lazy-load database."""

AUSTEN_SHA256: dict[str, str] = {
    "emma": "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75",
    "mansfieldpark": "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff",
    "northangerabbey": "8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d",
    "persuasion": "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140",
    "prideprejudice": "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3",
    "sensesensibility": "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26",
}
"""SHA-256 of each novel's text (its lines joined with ``"\\n"``, encoded as UTF-8)."""

AUSTEN_NOVELS: tuple[str, ...] = tuple(sorted(AUSTEN_SHA256))
"""The novel names accepted by `read_austen`, in alphabetical order."""

# --------------------------------------------------------------------------------------------
# A minimal reader of R's XDR serialization format (enough for janeaustenr's data objects)
# --------------------------------------------------------------------------------------------

# SEXP types (R's Rinternals.h) and the special codes of serialize.c.
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP = 9, 10, 13, 14, 15, 16
_DOTSXP, _VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 17, 19, 20, 24, 25
_ALTREP_SXP, _ATTRLISTSXP, _ATTRLANGSXP = 238, 239, 240
_BASEENV_SXP, _EMPTYENV_SXP, _BCREPREF, _BCREPDEF = 241, 242, 243, 244
_GENERICREFSXP, _CLASSREFSXP, _PERSISTSXP, _PACKAGESXP, _NAMESPACESXP = 245, 246, 247, 248, 249
_BASENAMESPACE_SXP, _MISSINGARG_SXP, _UNBOUNDVALUE_SXP = 250, 251, 252
_GLOBALENV_SXP, _NILVALUE_SXP, _REFSXP = 253, 254, 255

_IS_OBJECT_BIT = 1 << 8
_HAS_ATTR_BIT = 1 << 9
_HAS_TAG_BIT = 1 << 10
_NA_INT = -(2**31)

_SINGLETONS = frozenset(
    {
        _EMPTYENV_SXP,
        _BASEENV_SXP,
        _GLOBALENV_SXP,
        _UNBOUNDVALUE_SXP,
        _MISSINGARG_SXP,
        _BASENAMESPACE_SXP,
    }
)
_PAIRLIST_TYPES = frozenset(
    {_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP}
)
_PAIRLIST_CELLS = frozenset({_LISTSXP, _LANGSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP})
_REFERENCED_TYPES = frozenset({_SYMSXP, _ENVSXP, _PERSISTSXP, _PACKAGESXP, _NAMESPACESXP})

# Levels bits of a CHARSXP: how the bytes are encoded.
_LATIN1_MASK = 1 << 2
_UTF8_MASK = 1 << 3
_ASCII_MASK = 1 << 6


class _RSymbol(str):
    """An R symbol (a name), kept apart from character strings."""


class _RObject:
    """A deserialized R object: a value plus its attributes (names, class, ...)."""

    __slots__ = ("attributes", "sexptype", "value")

    def __init__(self, sexptype: int, value: Any, attributes: dict[str, Any] | None) -> None:
        self.sexptype = sexptype
        self.value = value
        self.attributes = attributes or {}

    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a Python list, if there is one."""
        names = self.attributes.get("names")
        if isinstance(names, _RObject):
            return list(names.value)
        return None


class _XdrReader:
    """Unserializes one R object stored in XDR (big-endian) format, version 2 or 3."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    # -- primitives ---------------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise DataError(
                f"corrupt R serialization: wanted {n} bytes at offset {self.pos} "
                f"of {len(self.data)}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower halves
            upper, lower = struct.unpack(">II", self._take(8))
            n = (upper << 32) | lower
        return n

    # -- the stream -----------------------------------------------------------------------------
    def read_stream(self) -> Any:
        """Reads the header and the one object that follows it."""
        magic = self._take(2)
        if magic != b"X\n":
            raise DataError(f"not an R XDR serialization (header {magic!r}); only XDR is supported")
        version = self.int()
        self.int()  # the R version that wrote it
        self.int()  # the minimal R version that can read it
        if version == 3:
            nelen = self.int()
            self.native_encoding = self._take(nelen).decode("ascii", "replace") or "utf-8"
        elif version != 2:
            raise DataError(f"unsupported R serialization version {version} (expected 2 or 3)")
        return self.item()

    def _string(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8", "replace")
        try:  # native encoding: UTF-8 for any file worth reading here
            return raw.decode(self.native_encoding)
        except (LookupError, UnicodeDecodeError):
            return raw.decode("utf-8", "replace")

    def _attributes(self) -> dict[str, Any]:
        pairlist = self.item()
        attrs: dict[str, Any] = {}
        if isinstance(pairlist, _RObject) and pairlist.sexptype == _LISTSXP:
            for tag, value in pairlist.value:
                attrs[str(tag)] = value
        return attrs

    def _pairlist(self, flags: int, sexptype: int) -> _RObject:
        """LISTSXP and friends: read the cells iteratively (pairlists can be long)."""
        cells: list[tuple[Any, Any]] = []
        first_attrs: dict[str, Any] | None = None
        while True:
            attrs = self._attributes() if flags & _HAS_ATTR_BIT else None
            if first_attrs is None:
                first_attrs = attrs
            tag = self.item() if flags & _HAS_TAG_BIT else None
            car = self.item()
            cells.append((tag, car))
            flags = self.int()
            kind = flags & 0xFF
            if kind not in _PAIRLIST_CELLS:
                # The CDR is not another cell: read it (usually NILVALUE) and stop.
                self.item(flags)
                break
        return _RObject(sexptype, cells, first_attrs)

    def item(self, flags: int | None = None) -> Any:
        """Reads one item; returns Python values, `_RObject` or `_RSymbol`."""
        if flags is None:
            flags = self.int()
        sexptype = flags & 0xFF
        if sexptype in (_NILVALUE_SXP, _NILSXP):
            return None
        if sexptype in _SINGLETONS:
            return _RObject(sexptype, None, None)
        if sexptype == _REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int()
            if not 1 <= index <= len(self.refs):
                raise DataError(f"corrupt R serialization: bad reference {index}")
            return self.refs[index - 1]
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(flags, sexptype)
        if sexptype == _CHARSXP:
            return self._string(flags >> 12)
        if sexptype in _REFERENCED_TYPES:
            return self._referenced(sexptype)
        if sexptype == _ALTREP_SXP:
            info, state, attrs = self.item(), self.item(), self.item()
            return _RObject(_ALTREP_SXP, {"info": info, "state": state}, attrs)
        value = self._vector(sexptype)
        attrs = self._attributes() if flags & _HAS_ATTR_BIT else None
        return _RObject(sexptype, value, attrs)

    def _referenced(self, sexptype: int) -> Any:
        """Symbols, environments and persistent names: added to the reference table."""
        if sexptype == _SYMSXP:
            symbol = _RSymbol(self.item() or "")
            self.refs.append(symbol)
            return symbol
        if sexptype == _ENVSXP:
            env = _RObject(_ENVSXP, None, None)
            self.refs.append(env)
            self.int()  # locked
            enclos, frame, hashtab, attrs = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            if isinstance(attrs, _RObject) and attrs.sexptype == _LISTSXP:
                env.attributes = {str(tag): value for tag, value in attrs.value}
            return env
        # PERSISTSXP, PACKAGESXP, NAMESPACESXP: a zero, a length, then that many CHARSXPs.
        if self.int() != 0:
            raise DataError("corrupt R serialization: bad persistent string vector")
        obj = _RObject(sexptype, [self.item() for _ in range(self.int())], None)
        self.refs.append(obj)
        return obj

    def _vector(self, sexptype: int) -> Any:
        """The payload of a vector type (the attributes, if any, follow it)."""
        if sexptype == _STRSXP:
            value: list[Any] = []
            for _ in range(self.length()):
                char_flags = self.int()
                if char_flags & 0xFF != _CHARSXP:
                    raise DataError(
                        "corrupt R serialization: string vector element of type "
                        f"{char_flags & 0xFF}"
                    )
                value.append(self._string(char_flags >> 12))
            return value
        if sexptype in (_LGLSXP, _INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            if sexptype == _LGLSXP:
                return [None if v == _NA_INT else bool(v) for v in ints]
            return [None if v == _NA_INT else v for v in ints]
        if sexptype == _REALSXP:
            n = self.length()
            return list(struct.unpack(f">{n}d", self._take(8 * n)))
        if sexptype == _CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        if sexptype == _RAWSXP:
            return self._take(self.length())
        if sexptype in (_VECSXP, _EXPRSXP):
            return [self.item() for _ in range(self.length())]
        if sexptype == _S4SXP:
            return None
        raise DataError(f"unsupported R object type {sexptype} in serialization")


def _unserialize(data: bytes) -> Any:
    """Unserializes an R object in XDR format (``serialize(x, NULL)`` output)."""
    return _XdrReader(data).read_stream()


def _decompress_record(record: bytes) -> bytes:
    """Decompresses one lazy-load record: a 4-byte big-endian length, then the compressed bytes.

    R writes zlib streams by default; ``compress = 2/3`` adds a type byte (``2`` bzip2, ``X`` xz,
    ``Z`` zlib, ``0`` stored) after the length.
    """
    if len(record) < 5:
        raise DataError("corrupt R lazy-load record (shorter than its header)")
    (expected,) = struct.unpack(">I", record[:4])
    body = record[4:]
    kind = body[:1]
    if kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    elif kind == b"Z" and body[1:2] == b"x":
        out = zlib.decompress(body[1:])
    else:
        out = zlib.decompress(body)
    if len(out) != expected:
        raise DataError(
            f"corrupt R lazy-load record: {len(out)} bytes after decompression, "
            f"header says {expected}"
        )
    return out


def _read_rdx(rdx: Path) -> dict[str, tuple[int, int]]:
    """The ``variables`` index of a lazy-load database: object name -> (offset, length)."""
    raw = rdx.read_bytes()
    gzipped = raw[:2] == b"\x1f\x8b"  # saveRDS-style gzip file (what Debian ships)
    payload = gzip.decompress(raw) if gzipped else _decompress_record(raw)
    index = _unserialize(payload)
    if not isinstance(index, _RObject) or index.sexptype != _VECSXP:
        raise DataError(f"{rdx} is not an R lazy-load index (a named list)")
    fields = dict(zip(index.names() or [], index.value, strict=False))
    variables = fields.get("variables")
    if not isinstance(variables, _RObject) or variables.sexptype != _VECSXP:
        raise DataError(f"{rdx} has no 'variables' entry")
    table: dict[str, tuple[int, int]] = {}
    for name, pos in zip(variables.names() or [], variables.value, strict=False):
        if name is None or not isinstance(pos, _RObject) or len(pos.value) != 2:
            raise DataError(f"{rdx}: malformed entry for {name!r}")
        offset, length = (int(v) for v in pos.value)
        table[name] = (offset, length)
    return table


def _iter_rdb_records(blob: bytes) -> list[bytes]:
    """Splits an .rdb into its records by following each zlib stream to its end."""
    records: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < 5:
            raise DataError(f"trailing {len(blob) - pos} bytes in R lazy-load database")
        (expected,) = struct.unpack(">I", blob[pos : pos + 4])
        stream = zlib.decompressobj()
        out = stream.decompress(blob[pos + 4 :])
        if not stream.eof or len(out) != expected:
            raise DataError("corrupt R lazy-load database (record does not decompress cleanly)")
        used = len(blob) - pos - 4 - len(stream.unused_data)
        records.append(out)
        pos += 4 + used
    return records


def _strsxp_lines(obj: Any, name: str, path: Path) -> list[str | None]:
    if not isinstance(obj, _RObject) or obj.sexptype != _STRSXP:
        raise DataError(f"{path}: object {name!r} is not a character vector")
    return obj.value


@functools.lru_cache(maxsize=4)
def _load_austen_db(path: Path) -> dict[str, str]:
    """Parses the janeaustenr database once per path: novel name -> text."""
    blob = path.read_bytes()
    rdx = path.with_suffix(".rdx")
    objects: dict[str, Any] = {}
    if rdx.is_file():
        for name, (offset, length) in _read_rdx(rdx).items():
            if name in AUSTEN_SHA256:
                objects[name] = _unserialize(_decompress_record(blob[offset : offset + length]))
    else:
        # No index: the objects are stored in alphabetical order of their names.
        logger.debug("%s missing; reading %s record by record", rdx, path)
        vectors = [
            obj
            for obj in map(_unserialize, _iter_rdb_records(blob))
            if isinstance(obj, _RObject) and obj.sexptype == _STRSXP
        ]
        if len(vectors) != len(AUSTEN_NOVELS):
            raise DataError(
                f"{path}: expected {len(AUSTEN_NOVELS)} character vectors, found {len(vectors)}"
            )
        objects = dict(zip(AUSTEN_NOVELS, vectors, strict=True))
    missing = [name for name in AUSTEN_NOVELS if name not in objects]
    if missing:
        raise DataError(f"{path}: novels missing from the database: {', '.join(missing)}")
    texts: dict[str, str] = {}
    for name in AUSTEN_NOVELS:
        lines = _strsxp_lines(objects[name], name, path)
        texts[name] = "\n".join("" if line is None else line for line in lines)
    return texts


def read_austen(novel: str, path: Path | None = None, verify: bool = True) -> str:
    """Returns the text of a Jane Austen novel from janeaustenr's R lazy-load database.

    Args:
        novel: one of `AUSTEN_NOVELS` (``emma``, ``mansfieldpark``, ``northangerabbey``,
            ``persuasion``, ``prideprejudice``, ``sensesensibility``).
        path: the ``Rdata.rdb`` file; defaults to `AUSTEN_RDB`. ``Rdata.rdx`` beside it is used
            as the index when present.
        verify: check the text's SHA-256 against `AUSTEN_SHA256`.

    Raises:
        DataError: unknown novel, database missing or unreadable, or checksum mismatch.
    """
    if novel not in AUSTEN_SHA256:
        raise DataError(
            f"unknown Austen novel {novel!r}; choose one of: {', '.join(AUSTEN_NOVELS)}"
        )
    rdb = Path(path) if path is not None else AUSTEN_RDB
    if not rdb.is_file():
        raise DataError(
            f"Jane Austen corpus not found at {rdb}; install it with "
            "`apt-get install r-cran-janeaustenr`, or calibrate on a local .txt file instead"
        )
    try:
        texts = _load_austen_db(rdb.resolve())
    except (OSError, zlib.error, lzma.LZMAError, EOFError, struct.error) as exc:
        raise DataError(f"cannot read the Jane Austen corpus at {rdb}: {exc}") from exc
    text = texts[novel]
    if verify:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != AUSTEN_SHA256[novel]:
            raise DataError(
                f"Austen novel {novel!r} from {rdb} has SHA-256 {digest}, expected "
                f"{AUSTEN_SHA256[novel]}; the janeaustenr package differs from the reference "
                "version (pass verify=False to use it anyway)"
            )
    return text


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------
