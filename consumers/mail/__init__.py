"""Pure message code: parsing, DSN reading, classification, MIME building; no I/O, no database."""
