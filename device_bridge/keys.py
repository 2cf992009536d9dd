"""Ed25519 signing keys: the workspace signs packages, devices trust its public key.

A key pair lives in one folder as two PEM files. The private key is written
with mode 0600 before any byte of it touches the disk, so it is never readable
by others, not even for a moment.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub"
_TEXT_PREFIX = "ed25519:"


@dataclass(frozen=True)
class KeyPair:
    private_key: Ed25519PrivateKey
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def public_text(self) -> str:
        return public_key_to_text(self.public_key)


def load_or_create_keypair(folder: str | os.PathLike) -> KeyPair:
    """Load the key pair in `folder`, creating it (private key mode 0600) on first use."""
    folder = Path(folder)
    private_path = folder / PRIVATE_KEY_FILE
    if private_path.exists():
        private = load_private_key(private_path)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_new_file(private_path, pem, mode=0o600)
    public_path = folder / PUBLIC_KEY_FILE
    if not public_path.exists():
        _write_new_file(public_path, public_key_to_pem(private.public_key()), mode=0o644)
    return KeyPair(private, private.public_key())


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Read a public key file: PEM, or one line of `ed25519:<base64>` text."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read public key {path}: {exc}") from None
    try:
        return public_key_from_text(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def public_key_to_text(key: Ed25519PublicKey) -> str:
    """One-line form for HTTP and config files: `ed25519:<base64 of the 32 raw bytes>`."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _TEXT_PREFIX + base64.b64encode(raw).decode()


def public_key_to_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Parse `ed25519:<base64>` or a PEM public key."""
    if not isinstance(text, str):
        raise ValueError("public key must be a string")
    text = text.strip()
    if text.startswith(_TEXT_PREFIX):
        try:
            raw = base64.b64decode(text[len(_TEXT_PREFIX):], validate=True)
        except ValueError:
            raise ValueError("public key is not valid base64") from None
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        return Ed25519PublicKey.from_public_bytes(raw)
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    raise ValueError("public key must be 'ed25519:<base64>' or a PEM block")


def key_id(key: Ed25519PublicKey) -> str:
    """Short stable name of a public key: first 16 hex digits of sha256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + mode at creation: a private key is never world-readable, even briefly,
    # and two processes racing to create the key cannot both win.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask may have narrowed the mode given to open()
    try:
        os.link(tmp, path)  # fails if another process created the key first
    except FileExistsError:
        pass
    except OSError:  # filesystems without hard links (FAT on an SD card)
        if not path.exists():
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            os.unlink(tmp)
