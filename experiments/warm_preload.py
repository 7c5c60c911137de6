"""Imported once by a site's warm ClientApp forkserver (`experiments/warm_clientapp.py`); the site's
warm worker (`experiments/site_worker.py`) and any one-off ClientApp process fork from it with these
already loaded.

It also pins `code_hash()` — the hash of the role code a site's approval names — to the code this
forkserver loaded: a site whose files are replaced under a running SuperNode keeps reporting (and
running, in its worker too) the code it started with until it is restarted, so an approval of the new
files does not cover old code.
"""

import encodings.cp437  # noqa: F401 - zipfile reads the FAB's names with it

import eth_hash.backends.pycryptodome  # noqa: F401 - web3's keccak backend, chosen at its first hash
import flwr.supernode.cli  # noqa: F401 - the flwr-clientapp entry point
import flwr.supernode.runtime.run_clientapp  # noqa: F401
import h11  # noqa: F401
import httpcore  # noqa: F401 - httpx imports its transport at the first Runtime API client: ~0.3 s per message otherwise
import medtwin.experiments.flower_apps  # noqa: F401 - the ClientApp and everything it imports
import torch._dynamo  # noqa: F401 - torch.optim imports it lazily at the first optimizer: ~4 s per message otherwise
import torch.nn.utils._per_sample_grad  # noqa: F401 - per-sample gradients of DP training
import vyper  # noqa: F401 - the chain reader checks the compiler version of the contracts it loads
from medtwin.core.hashing import code_hash

CODE_HASH = code_hash()  # lru_cached: the children inherit this value
