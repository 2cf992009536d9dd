"""Delta updates: version N+1's package as a zstd frame compressed against version N's package bytes.

The old package is loaded as a raw-content dictionary (zstd's ``--patch-from``: the new package is
compressed with the old one as the history it may copy from), with a window that covers both, so an
unchanged run of bytes anywhere in the old package costs a few bytes. The hub makes each
(from, to) delta once and caches it (hub/deltas.py); the agent rebuilds the new package from the
version it has installed (package.encode_installed) and trusts the result only once its sha256 is
the one the desired state names, and its signature checks at install.

zstd's window must hold the whole old package: the decompressor needs about that much memory
(``max_window_size``), bounded here by the agent's package limit.
"""

from __future__ import annotations

LEVEL = 19  # the hub compresses once per pair; devices only decompress (fast at any level)
MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame


class DeltaError(ValueError):
    """A delta that cannot be made or does not apply; the full package is used instead."""


def _window_log(*sizes: int) -> int:
    return max(10, min(31, max(sizes).bit_length() + 1))


def make(old: bytes, new: bytes, level: int = LEVEL) -> bytes:
    """``new`` compressed against ``old``."""
    import zstandard as zstd

    params = zstd.ZstdCompressionParameters.from_level(
        level,
        window_log=_window_log(len(old), len(new)),
        source_size=len(new),
        write_content_size=True,
        write_checksum=True,
    )
    d = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=d, compression_params=params).compress(new)


def apply(old: bytes, delta: bytes, limit: int) -> bytes:
    """The new package from ``old`` and ``delta``: at most ``limit`` bytes, else DeltaError (as for a
    frame that is not zstd, damaged, or made against other bytes)."""
    import zstandard as zstd

    if not delta.startswith(MAGIC):
        raise DeltaError("not a zstd frame")
    try:
        size = zstd.frame_content_size(delta)
    except zstd.ZstdError as exc:
        raise DeltaError(f"bad zstd frame header: {exc}") from None
    if size < 0 or size > limit:
        raise DeltaError(
            f"the delta rebuilds {size} bytes, over the limit of {limit}"
            if size > 0
            else "the delta does not say its size"
        )
    d = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    try:
        return zstd.ZstdDecompressor(
            dict_data=d, max_window_size=1 << _window_log(len(old), size)
        ).decompress(delta, max_output_size=size)
    except zstd.ZstdError as exc:
        raise DeltaError(f"the delta does not apply: {exc}") from None
