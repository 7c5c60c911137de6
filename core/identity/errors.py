"""Errors of the identity layer: provisioning, kits, envelopes, signatures."""

from __future__ import annotations

from ..errors import MedtwinError


class IdentityError(MedtwinError):
    """Base class of identity and key-handling failures."""


class ProvisionError(IdentityError):
    """`provision_federation` was asked for something it must not do (bad ids, non-empty directory)."""


class KitError(IdentityError):
    """A site or coordinator kit is missing a file, has unsafe permissions, or disagrees with the manifest."""


class EnvelopeError(IdentityError):
    """A key envelope is not for this kit, or fails authentication (wrong key, tampered, wrong binding)."""


class SignatureError(IdentityError):
    """An update signature does not verify for the claimed (run, round, site, ciphertext digest)."""
