"""Chain accounts: who signs a transaction. Every transaction is signed locally (eth-account).

`dev_account(label)` derives a deterministic key from a public label: fine for the embedded and
local anvil backends (the keys are as public as anvil's own dev keys), never for a shared chain.
On the rpc backend keys come from environment variables named in the chain config.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from .errors import ChainSetupError

__all__ = ["ChainAccount", "account_from_env", "dev_account"]

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class ChainAccount:
    """An address plus the means to sign for it (the key never appears in repr)."""

    label: str
    address: str
    _signer: LocalAccount = field(repr=False, compare=False)

    @classmethod
    def from_key(cls, private_key: bytes | str, *, label: str) -> ChainAccount:
        signer = Account.from_key(private_key)
        return cls(label=label, address=signer.address, _signer=signer)

    def sign_transaction(self, transaction: dict[str, Any]) -> bytes:
        return bytes(self._signer.sign_transaction(transaction).raw_transaction)


def dev_account(label: str) -> ChainAccount:
    """A deterministic development account for `label` (e.g. "admin", "coordinator", "site:hosp0")."""
    counter = 0
    while True:
        seed = hashlib.sha256(f"medtwin.dev-account:{label}:{counter}".encode()).digest()
        if 0 < int.from_bytes(seed, "big") < _SECP256K1_ORDER:
            return ChainAccount.from_key(seed, label=label)
        counter += 1


def account_from_env(variable: str, *, label: str) -> ChainAccount:
    """An account whose hex private key is in environment variable `variable`."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ChainSetupError(
            f"the {label} key is not set: environment variable {variable} is empty — export it as a hex "
            f"private key, or change the variable name in chain.{label}_key_env"
        )
    try:
        return ChainAccount.from_key(value, label=label)
    except (ValueError, TypeError) as error:
        raise ChainSetupError(f"environment variable {variable} does not hold a valid hex private key") from error
