"""A site for one run: the hospital's own site file, and the coordinator's proposal it accepted.

Data, kit, privacy policy, budget ledger and approvals come from the site file; the proposal only
chooses the knobs the site file lets a coordinator set (client/proposal.py).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from medtwin.core.identity import SiteKit, load_site_kit
from medtwin.core.identity.kits import CA_CERT_FILE, KEY_AGREEMENT_KEY_FILE, SIGNING_KEY_FILE, SITE_FILE
from medtwin.core.identity.manifest import MANIFEST_FILE
from medtwin.core.identity.steward import HE_DIR, SECRET_CONTEXT_NAME
from medtwin.core.errors import ConfigError
from medtwin.core.tasks import CsvTask, SiteSplit, TwinTask, VitalsTask, get_task

from .codec import CkksSiteCodec, PlainSiteCodec
from .privacy import BudgetLedger, SitePolicy
from .proposal import ProposalRefused, RunProposal, parse_proposal
from .site_file import SiteFile, SiteFileError, load_site_file

SiteCodec = PlainSiteCodec | CkksSiteCodec
LEDGER_FILE = "privacy-ledger.json"
LEDGER_MARK_FILE = "ledger-mark.json"  # in the kit: a deleted or rolled-back ledger is noticed


@dataclass(frozen=True)
class Site:
    """Everything a site needs for one run."""

    file: SiteFile
    proposal: RunProposal
    task: TwinTask
    data: SiteSplit
    codec: SiteCodec
    kit: SiteKit
    # task.normalization=federated: the rows before normalisation (float64, NaN where missing); `data` holds
    # them too until client/normalization.py z-scores them with the certified global statistics
    raw_data: SiteSplit | None = None

    @property
    def config(self):
        return self.proposal.config

    @property
    def num_parameters(self) -> int:
        """Values in one update of this run's model (what a statistics update is padded to)."""
        return sum(parameter.numel() for parameter in self.task.build_model().state_dict().values())

    @property
    def site_id(self) -> str:
        return self.file.site_id

    @property
    def seed_index(self) -> int:
        """Distinguishes sites' training seeds (the task's site index for shipped datasets)."""
        if self.file.task.name == "csv":
            return zlib.crc32(self.site_id.encode()) % 10_000
        return self.file.builtin_index

    def policy(self) -> SitePolicy:
        return self.file.privacy

    def ledger(self) -> BudgetLedger:
        return open_ledger(self.file)


def open_ledger(site_file: SiteFile) -> BudgetLedger:
    return BudgetLedger(
        site_file.state_dir / LEDGER_FILE, site_file.site_id, mark_path=site_file.kit_dir / LEDGER_MARK_FILE
    )


def load_site(site_file_path: str | Path, proposal_text: str) -> Site:
    """The site for this proposal (cached per process: Flower may call the app many times a run).

    A cached site is used only while the site file, the kit files it was built from and the data file
    are the ones it read (`_inputs_stamp`): a kit that installed a newer federation manifest (a member
    removed), a re-keyed HE context or new data rows are read by the next message, as in a fresh process.

    Raises `ProposalRefused` for a proposal this site will not run, `SiteFileError` / `KitError`
    for a broken site installation.
    """
    path = Path(site_file_path).expanduser().resolve()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as error:
        raise SiteFileError(str(path), [f"cannot read it: {error.strerror or error}"]) from None
    return _load_site(str(path), stamp, proposal_text, _inputs_stamp(_site_file(str(path), stamp)))


# Sites kept per process. Deployed, a process serves one site; simulated, each Ray actor serves whichever
# virtual sites the engine hands it, round after round, so the cache holds every site of a large run
# rather than reloading (site file, proposal, kit, data) at every message. A deployed site's warm worker
# keeps far fewer (`keep_sites`): the coordinator chooses the proposal text, and each text holds a Site.
SITES_KEPT = 256

# What a Site is built from besides its site file and the proposal: the kit's identity and manifest
# (core/identity/kits.py) and its HE secret contexts (he/<key_id>/secret_context.bin).
_KIT_FILES = (MANIFEST_FILE, SITE_FILE, CA_CERT_FILE, SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE)


def _file_stamp(path: Path) -> tuple[str, int, int, int] | tuple[str]:
    try:
        status = path.stat()
    except OSError:
        return (str(path),)
    return (str(path), status.st_mtime_ns, status.st_size, status.st_ino)


def _inputs_stamp(site_file: SiteFile) -> tuple:
    """(path, mtime, size, inode) of every file other than the site file that a Site is built from."""
    kit = Path(site_file.kit_dir)
    paths = [kit / name for name in _KIT_FILES] + sorted((kit / HE_DIR).glob(f"*/{SECRET_CONTEXT_NAME}"))
    if site_file.data_path is not None:
        paths.append(Path(site_file.data_path))
    return tuple(_file_stamp(path) for path in paths)


@lru_cache(maxsize=SITES_KEPT)
def _site_file(path: str, stamp: int) -> SiteFile:
    return load_site_file(path)


def _build_site(path: str, stamp: int, proposal_text: str, inputs: tuple) -> Site:
    site_file = _site_file(path, stamp)
    proposal = parse_proposal(proposal_text, site_file)
    kit = load_site_kit(site_file.kit_dir)
    if kit.site_id != site_file.site_id:
        raise SiteFileError(path, [f"`kit_dir` {site_file.kit_dir} holds the identity of {kit.site_id!r}, not {site_file.site_id!r}"])
    try:
        task = get_task(proposal.config.task)
        data = load_site_data(site_file, task)
    except ConfigError as error:  # the proposal's task settings do not fit this site's data: a refusal, not a crash
        raise ProposalRefused("bad_proposal", str(error)) from None
    codec: SiteCodec = PlainSiteCodec()
    if proposal.config.crypto.name == "ckks":
        codec = CkksSiteCodec.from_kit(site_file.kit_dir, proposal.config.crypto.key_id)
    raw_data = data if proposal.config.task.normalization == "federated" else None
    return Site(file=site_file, proposal=proposal, task=task, data=data, codec=codec, kit=kit, raw_data=raw_data)


_load_site = lru_cache(maxsize=SITES_KEPT)(_build_site)


def keep_sites(count: int) -> None:
    """Keep at most `count` Sites in this process from now on (the ones kept so far are dropped)."""
    global _load_site
    _load_site = lru_cache(maxsize=count)(_build_site)


def load_site_data(site_file: SiteFile, task: TwinTask) -> SiteSplit:
    """The site's rows, normalised with its own train statistics — or, under `task.normalization=federated`,
    not yet normalised (client/normalization.py does it with the certified global statistics)."""
    federated = task.config.normalization == "federated"
    if isinstance(task, CsvTask):
        assert site_file.data_path is not None
        return task.load_site_file(site_file.data_path, site_id=site_file.site_id, normalise=not federated)
    if isinstance(task, VitalsTask) and site_file.data_path is not None:  # the hospital's own streams
        return task.load_site_streams(site_file.data_path, site_id=site_file.site_id)
    ids = task.site_ids()
    if not 0 <= site_file.builtin_index < len(ids):
        raise SiteFileError(str(site_file.path), [f"`data.builtin.index` {site_file.builtin_index} is outside 0..{len(ids) - 1}"])
    data = task.load_site_unnormalised(site_file.builtin_index) if federated else task.load_site(site_file.builtin_index)
    if data.site_id != site_file.site_id:
        raise SiteFileError(
            str(site_file.path),
            [f"`data.builtin.index` {site_file.builtin_index} of {task.name} is site {data.site_id!r}, but site_id is {site_file.site_id!r}"],
        )
    return data


def dataset_manifest_hash(site: Site) -> str:
    """sha256 of a manifest of the site's data (shapes + digests of its arrays): a commitment, never the data."""
    digest = hashlib.sha256(f"medtwin/dataset/v1\x00{site.file.task.name}\x00{site.site_id}".encode())
    data = site.raw_data if site.raw_data is not None else site.data  # the data, not how this run normalised it
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        digest.update(repr(array.shape).encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest())
    return digest.hexdigest()
