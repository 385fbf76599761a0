"""Limits shared by the hook's fast path and the parsers (no imports: the hook loads this first)."""

# Real domain XMLs are a few KiB; a generous cap still stops a memory-exhaustion attempt.
MAX_XML_BYTES = 4 * 1024 * 1024
