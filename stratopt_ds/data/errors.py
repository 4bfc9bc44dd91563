"""The data path's errors: each names the file, store or option at fault and what is allowed."""


class DataError(ValueError):
    """Bad data input: a source, a tokenizer, a store or an option that cannot be used."""


class SourceError(DataError):
    """A source that cannot be read; the message names the file and the fault."""


class TokenizerError(DataError):
    """A tokenizer that cannot be made, or does not fit the request; the message names it."""


class StoreError(DataError):
    """A store that is missing, incomplete, corrupted or does not fit the request."""
