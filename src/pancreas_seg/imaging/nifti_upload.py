"""Reading an uploaded NIfTI file from bytes, within limits checked before its voxel data is inflated.

A served model receives ``.nii`` / ``.nii.gz`` bytes from clients it does not trust. A 1 MB gzip
can inflate to gigabytes, and a header can claim any shape, so the order here is:

1. the upload's own size (bytes, compressed or not) against :attr:`VolumeLimits.max_file_bytes`;
2. the header only: at most the first :data:`HEADER_PREFIX_BYTES` bytes are inflated, and the
   NIfTI-1 or NIfTI-2 header they hold is checked: 3 dimensions, each at most
   :attr:`VolumeLimits.max_dim` voxels, at most :attr:`VolumeLimits.max_voxels` voxels, a real
   voxel type, voxel spacing (mm, from the affine as :class:`~pancreas_seg.imaging.nifti_io.NiftiVolume`
   measures it) within [:attr:`~VolumeLimits.min_spacing_mm`, :attr:`~VolumeLimits.max_spacing_mm`];
3. the voxel data, inflated in chunks into one buffer of exactly the size the header declares:
   a stream that would inflate past it is stopped one byte later and refused, a stream that ends
   early (truncated) or fails its CRC is refused.

Every refusal is an :class:`UploadRefused` whose message names the problem and never a file or a
path (the bytes have none), with the HTTP status a server should answer: 413 past a size limit,
400 for anything malformed. The array and scaling are those nibabel's ``ArrayProxy`` gives
(``np.asanyarray(image.dataobj)``), so a served scan is read exactly as
:func:`~pancreas_seg.imaging.nifti_io.load_nifti` reads the same file from disk.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from pancreas_seg.imaging.nifti_io import NiftiVolume

HEADER_CLASSES: dict[int, type[nib.Nifti1Header]] = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
"""``sizeof_hdr`` -> the header class (NIfTI-1: 348 bytes, NIfTI-2: 540 bytes)."""
SINGLE_FILE_MAGIC = (b"n+1", b"n+2")
HEADER_PREFIX_BYTES = 544
"""Bytes inflated to read a header: the NIfTI-2 header (540) and the extension flag (4)."""
MAX_DATA_OFFSET_BYTES = 1 << 20
"""Largest accepted ``vox_offset`` (header plus extensions), bytes."""
CHUNK_BYTES = 1 << 20
"""Compressed bytes fed to the inflater at a time."""
VOXEL_KINDS = "iuf"
"""Accepted voxel types: signed and unsigned integers, floats (no complex, RGB or structured types)."""
GZIP_MAGIC = b"\x1f\x8b"

BAD_REQUEST, TOO_LARGE = 400, 413


class UploadRefused(ValueError):
    """An upload that is not read; ``status`` is the HTTP status to answer (400 or 413)."""

    def __init__(self, message: str, status: int = BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class VolumeLimits:
    """What an uploaded scan may be. The defaults fit a 512 x 512 x 1000 CT.

    Attributes:
        max_file_bytes: the uploaded file's size, bytes (``.nii.gz`` as sent, or ``.nii``).
        max_voxels: voxels in the volume (product of the 3 dimensions); 2**28 = 512 x 512 x 1024.
        max_dim: voxels along any one axis.
        min_spacing_mm: smallest voxel size along any axis, mm.
        max_spacing_mm: largest voxel size along any axis, mm.
    """

    max_file_bytes: int = 768 * 2**20
    max_voxels: int = 512 * 512 * 1024
    max_dim: int = 2048
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_file_bytes, self.max_voxels, self.max_dim) < 1:
            raise ValueError(f"volume limits must be positive: {self}")
        if not 0 < self.min_spacing_mm <= self.max_spacing_mm:
            raise ValueError(f"volume limits: need 0 < min_spacing_mm <= max_spacing_mm, got {self}")


@dataclass(frozen=True)
class UploadHeader:
    """An upload's checked header: what its voxel data must be."""

    header: nib.Nifti1Header
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    compressed: bool

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header declares."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Bytes of the (inflated) file the header declares: header, extensions and voxel data."""
        return self.offset + self.data_bytes

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.header.get_best_affine(), dtype=np.float64)

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size along each array axis, mm (the affine's column norms, as ``NiftiVolume``)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _inflate_prefix(payload: bytes, size: int) -> bytes:
    """The first ``size`` bytes of a gzip stream (or fewer, if it is shorter); nothing more is inflated."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        return inflater.decompress(payload[:CHUNK_BYTES], size)
    except zlib.error as exc:
        raise UploadRefused(f"not readable as NIfTI (gzip data is corrupt: {exc})") from None


def read_upload_header(payload: bytes, limits: VolumeLimits) -> UploadHeader:
    """Check an upload's size and NIfTI header against ``limits``, inflating only the header.

    Raises:
        UploadRefused: 413 past a size limit, 400 for a file that is not a usable 3D NIfTI volume.
    """
    if len(payload) > limits.max_file_bytes:
        raise UploadRefused(f"the file is {len(payload)} bytes, more than the limit of {limits.max_file_bytes} bytes",
                            TOO_LARGE)
    compressed = payload[:2] == GZIP_MAGIC
    prefix = _inflate_prefix(payload, HEADER_PREFIX_BYTES) if compressed else payload[:HEADER_PREFIX_BYTES]
    header = _parse_header(prefix)
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a corrupt header
        raise UploadRefused(f"not readable as NIfTI ({type(exc).__name__}: {exc})") from None
    if any(n < 1 for n in shape):
        raise UploadRefused(f"not readable as NIfTI (dimensions {shape})")
    if len(shape) != 3:
        raise UploadRefused(f"image must be 3D, got {len(shape)}D with shape {shape}")
    if max(shape) > limits.max_dim:
        raise UploadRefused(f"the header declares shape {shape}; at most {limits.max_dim} voxels along any axis "
                            "are accepted", TOO_LARGE)
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > limits.max_voxels:
        raise UploadRefused(f"the header declares {n_voxels} voxels (shape {shape}); at most {limits.max_voxels} "
                            "are accepted", TOO_LARGE)
    if dtype.kind not in VOXEL_KINDS or dtype.fields is not None:
        raise UploadRefused(f"voxel type {dtype} is not a CT intensity type (integers or floats)")
    offset = int(header.get_data_offset())
    if not header.sizeof_hdr + 4 <= offset <= MAX_DATA_OFFSET_BYTES:
        raise UploadRefused(f"not readable as NIfTI (voxel data offset {offset} is not between "
                            f"{header.sizeof_hdr + 4} and {MAX_DATA_OFFSET_BYTES} bytes)")
    checked = UploadHeader(header, shape, dtype, offset, compressed)
    spacing = checked.spacing_mm
    if not np.all(np.isfinite(checked.affine)):
        raise UploadRefused("the header's affine has non-finite values")
    if not all(limits.min_spacing_mm <= s <= limits.max_spacing_mm for s in spacing):
        raise UploadRefused(f"voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside the accepted "
                            f"range [{limits.min_spacing_mm}, {limits.max_spacing_mm}] mm")
    if not compressed and len(payload) != checked.file_bytes:
        _wrong_size(len(payload), checked.file_bytes)
    return checked


def _parse_header(prefix: bytes) -> nib.Nifti1Header:
    for endianness in ("<", ">"):
        size = int(np.frombuffer(prefix[:4], dtype=f"{endianness}i4")[0]) if len(prefix) >= 4 else 0
        if size in HEADER_CLASSES:
            break
    else:
        raise UploadRefused("not readable as NIfTI (no NIfTI-1 or NIfTI-2 header)")
    if len(prefix) < size:
        raise UploadRefused(f"not readable as NIfTI (the file ends inside its {size}-byte header)")
    try:
        header = HEADER_CLASSES[size](binaryblock=prefix[:size], endianness=endianness, check=True)
    except Exception as exc:  # noqa: BLE001 - HeaderDataError, ValueError, ... for a corrupt header
        raise UploadRefused(f"not readable as NIfTI ({type(exc).__name__}: {exc})") from None
    if bytes(header["magic"]).rstrip(b"\x00")[:3] not in SINGLE_FILE_MAGIC:
        raise UploadRefused("not readable as NIfTI (not a single-file .nii header: magic "
                            f"{bytes(header['magic'])!r})")
    return header


def _wrong_size(actual: int, declared: int) -> None:
    if actual < declared:
        raise UploadRefused(f"voxel data unreadable, the file looks truncated ({actual} of the {declared} bytes "
                            "its header declares)")
    raise UploadRefused(f"the file holds more data than its header declares (more than {declared} bytes)")


def inflate_exactly(payload: bytes, size: int) -> bytearray:
    """Inflate a gzip stream (one or more members) into a buffer of exactly ``size`` bytes.

    Never inflates more than ``size + 1`` bytes: a stream holding more is refused as soon as it
    passes ``size``. A stream that ends early, does not end (no gzip trailer), fails its CRC or
    is corrupt is refused too. Trailing zero bytes after the last member are ignored.

    Raises:
        UploadRefused: 400, with the reason.
    """
    out = bytearray(size)
    source, position, filled = memoryview(payload), 0, 0
    inflater, tail = zlib.decompressobj(wbits=31), b""
    try:
        while True:
            if not tail:
                if position >= len(source):
                    break
                tail = source[position:position + CHUNK_BYTES]
                position += len(tail)
            piece = inflater.decompress(tail, size - filled + 1)
            tail = inflater.unconsumed_tail
            if filled + len(piece) > size:
                _wrong_size(size + 1, size)
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            if inflater.eof:
                position -= len(inflater.unused_data)   # the next member starts there
                tail = b""
                rest = source[position:]
                if not rest or not any(rest):
                    break
                inflater = zlib.decompressobj(wbits=31)
    except zlib.error as exc:
        raise UploadRefused(f"voxel data unreadable, the gzip stream is corrupt ({exc})") from None
    if filled < size:
        _wrong_size(filled, size)
    if not inflater.eof:
        raise UploadRefused("voxel data unreadable, the gzip stream is truncated (it has no end)")
    return out


def read_upload(payload: bytes, limits: VolumeLimits) -> NiftiVolume:
    """A NIfTI file's bytes (``.nii`` or ``.nii.gz``) as a volume, after :func:`read_upload_header`.

    The voxel data is inflated into one buffer of the declared size (see :func:`inflate_exactly`);
    the array is a view of it, scaled with the header's ``scl_slope`` / ``scl_inter`` as nibabel
    scales (``np.asanyarray(image.dataobj)``). Float volumes must be finite.

    Raises:
        UploadRefused: 413 past a limit of ``limits``, 400 for a file that is not a usable volume.
    """
    checked = read_upload_header(payload, limits)
    buffer: Any = inflate_exactly(payload, checked.file_bytes) if checked.compressed else payload
    raw = np.ndarray(checked.shape, dtype=checked.dtype, buffer=buffer, offset=checked.offset, order="F")
    array = _scaled(raw, checked.header)
    if array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise UploadRefused(f"image has {n_bad} non-finite voxels (NaN or inf)")
    return NiftiVolume(array=array, affine=checked.affine, header=checked.header)


def _scaled(raw: np.ndarray, header: nib.Nifti1Header) -> np.ndarray:
    """``raw`` scaled as nibabel's ``ArrayProxy.__array__()`` scales it (``_get_scaled`` with no dtype)."""
    slope, inter = header.get_slope_inter()
    scl_slope = np.asanyarray(1.0 if slope is None else slope)
    scl_inter = np.asanyarray(0.0 if inter is None else inter)
    use_dtype = scl_slope.dtype
    if np.can_cast(scl_slope, use_dtype):
        scl_slope = scl_slope.astype(use_dtype)
    if np.can_cast(scl_inter, use_dtype):
        scl_inter = scl_inter.astype(use_dtype)
    return apply_read_scaling(raw, scl_slope, scl_inter)
