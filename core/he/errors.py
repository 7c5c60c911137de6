"""Errors of the HE layer: bad parameters (config errors) and bad ciphertexts/contexts (runtime)."""

from __future__ import annotations

from ..errors import ConfigError, MedtwinError


class CkksParameterError(ConfigError):
    """A CKKS parameter set is malformed (e.g. a prime too small for the ring dimension)."""


class InsecureParametersError(CkksParameterError):
    """The parameters fall outside the HomomorphicEncryption.org security table."""


class ImpreciseParametersError(CkksParameterError):
    """The parameters cannot meet the precision target, or the value range would overflow."""


class HeError(MedtwinError):
    """Base class of runtime HE failures (contexts, ciphertexts, value ranges)."""


class HeContextError(HeError):
    """A context is of the wrong kind (public vs secret), corrupt, or does not match its header."""


class CiphertextMismatchError(HeError):
    """An encrypted update does not fit the federation's context (key set, parameters, shape)."""


class ValueRangeError(HeError):
    """A value to encrypt (or a decrypted sum) lies outside the range the parameters were chosen for."""
