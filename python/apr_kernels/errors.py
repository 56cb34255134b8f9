"""Exceptions raised by apr_kernels."""


class AprFormatError(ValueError):
    """A file is not a valid APR v2 file (or uses a feature this reader refuses).

    The message always names the file, the field or tensor at fault, and what was expected.
    """
