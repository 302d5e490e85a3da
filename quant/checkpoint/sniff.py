"""What a file that is not safetensors looks like (asked only after the format checks failed, so a
valid file is never misnamed): a Git LFS pointer, an HTML page, a pickle, a GGUF file."""

from __future__ import annotations

_SNIFF_BYTES = 1024


def _sniff(head: bytes) -> str | None:
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    lower = stripped[:256].lower()
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return (
            "is a Git LFS pointer file, not the model weights (the real file was never downloaded): "
            "run `git lfs pull` in the repository it came from, or download the file itself"
        )
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        lower.startswith(b"<") and b"<html" in head.lower()
    ):
        return (
            "is an HTML page (an error or login page was saved instead of the model): download the "
            "file again (on Hugging Face use the file's download link, not its web page)"
        )
    if head.startswith(b"GGUF"):
        return (
            "is a GGUF file renamed to .safetensors: load it with a GGUF loader (e.g. ComfyUI-GGUF); "
            "this loader quantizes ordinary bf16/fp16 .safetensors files"
        )
    # Pickle: PROTO opcode 0x80, protocol 2-5, then an opcode (never 0x00). A safetensors length
    # field of 0x0280-0x05ff bytes would also start 80 0x, but its third byte is 0.
    if head.startswith(b"PK\x03\x04") or (
        len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0
    ):
        return (
            "is a PyTorch pickle checkpoint (.ckpt/.pt/.bin) renamed to .safetensors; this pack never "
            "unpickles files (unpickling can run code): use the model's .safetensors release, or "
            "convert it with a tool you trust"
        )
    if stripped.startswith((b"{", b"[")):
        return (
            "is a JSON text file, not a safetensors file (a safetensors file starts with an 8-byte "
            "header length): check that you picked the model file, not its config"
        )
    return None


