# pragma version 0.4.3
"""
@title FederationRegistry (medtwin authorization chain)
@notice Roles, site identities, per-site run approvals, expiring grants, revocations, and one
        `AccessDecision` event for every access decision the federation makes.
        Only addresses, hashes, timestamps and short labels live here, never patient data.
        Keys are bytes32 hashes computed off chain (see medtwin.chain.encoding): a run id is
        sha256("medtwin.run:" + run_id), a site key sha256("medtwin.site:" + site_id).
"""

ROLE_ADMIN: public(constant(uint256)) = 1
ROLE_COORDINATOR: public(constant(uint256)) = 2
ROLE_SITE: public(constant(uint256)) = 4
ROLE_AUDITOR: public(constant(uint256)) = 8
ROLE_RESEARCHER: public(constant(uint256)) = 16
ALL_ROLES: constant(uint256) = 31
MAX_BATCH: constant(uint256) = 1024


struct Site:
    site_key: bytes32
    name: String[64]
    key_fingerprint: bytes32
    registered_at: uint256
    revoked_at: uint256


struct Approval:
    config_hash: bytes32
    code_hash: bytes32
    approved_at: uint256
    withdrawn_at: uint256


struct Grant:
    expires_at: uint256
    granted_at: uint256
    revoked_at: uint256
    granted_by: address


event RoleGranted:
    account: indexed(address)
    role: uint256
    by: indexed(address)

event RoleRevoked:
    account: indexed(address)
    role: uint256
    by: indexed(address)

event SiteRegistered:
    site: indexed(address)
    site_key: indexed(bytes32)
    name: String[64]
    key_fingerprint: bytes32
    timestamp: uint256

event SiteRevoked:
    site: indexed(address)
    site_key: indexed(bytes32)
    reason: bytes32
    timestamp: uint256

event RunApproved:
    site: indexed(address)
    run_id: indexed(bytes32)
    config_hash: bytes32
    code_hash: bytes32
    timestamp: uint256

event ApprovalWithdrawn:
    site: indexed(address)
    run_id: indexed(bytes32)
    timestamp: uint256

event GrantIssued:
    grantee: indexed(address)
    scope: indexed(bytes32)
    expires_at: uint256
    by: address

event GrantRevoked:
    grantee: indexed(address)
    scope: indexed(bytes32)
    by: address

event AccessDecision:
    actor: indexed(address)
    action: indexed(bytes32)
    run_id: indexed(bytes32)
    site_key: bytes32
    subject: bytes32
    granted: bool
    reason: bytes32
    round_index: uint256
    recorder: address
    timestamp: uint256

event DecisionBatch:
    batch_id: indexed(bytes32)
    run_id: indexed(bytes32)
    round_index: uint256
    count: uint256


roles: public(HashMap[address, uint256])
sites: public(HashMap[address, Site])
site_address: public(HashMap[bytes32, address])
site_count: public(uint256)
approvals: public(HashMap[address, HashMap[bytes32, Approval]])
grants: public(HashMap[address, HashMap[bytes32, Grant]])
batches: public(HashMap[bytes32, uint256])


@deploy
def __init__():
    self.roles[msg.sender] = ROLE_ADMIN
    log RoleGranted(account=msg.sender, role=ROLE_ADMIN, by=msg.sender)


@internal
@view
def _require_admin():
    assert self.roles[msg.sender] & ROLE_ADMIN != 0, "caller lacks the admin role"


@internal
@view
def _require_coordinator():
    assert self.roles[msg.sender] & ROLE_COORDINATOR != 0, "caller lacks the coordinator role"


@external
@view
def has_role(account: address, role: uint256) -> bool:
    return self.roles[account] & role == role and role != 0


@external
def grant_role(account: address, role: uint256):
    self._require_admin()
    assert account != empty(address), "account is the zero address"
    assert role != 0 and role & ALL_ROLES == role, "unknown role bits"
    self.roles[account] = self.roles[account] | role
    log RoleGranted(account=account, role=role, by=msg.sender)


@external
def revoke_role(account: address, role: uint256):
    self._require_admin()
    assert role != 0 and role & ALL_ROLES == role, "unknown role bits"
    assert not (account == msg.sender and role & ROLE_ADMIN != 0), "admin cannot revoke its own admin role"
    self.roles[account] = self.roles[account] & (ALL_ROLES ^ role)
    log RoleRevoked(account=account, role=role, by=msg.sender)


@external
def register_site(site: address, site_key: bytes32, name: String[64], key_fingerprint: bytes32):
    self._require_admin()
    assert site != empty(address), "site is the zero address"
    assert site_key != empty(bytes32), "site key is empty"
    assert key_fingerprint != empty(bytes32), "key fingerprint is empty"
    assert self.sites[site].registered_at == 0, "site address already registered"
    assert self.site_address[site_key] == empty(address), "site id already registered"
    self.sites[site] = Site(
        site_key=site_key,
        name=name,
        key_fingerprint=key_fingerprint,
        registered_at=block.timestamp,
        revoked_at=0,
    )
    self.site_address[site_key] = site
    self.site_count += 1
    self.roles[site] = self.roles[site] | ROLE_SITE
    log SiteRegistered(site=site, site_key=site_key, name=name, key_fingerprint=key_fingerprint, timestamp=block.timestamp)


@external
def revoke_site(site_key: bytes32, reason: bytes32):
    self._require_admin()
    site: address = self.site_address[site_key]
    assert site != empty(address), "site is not registered"
    assert self.sites[site].revoked_at == 0, "site already revoked"
    self.sites[site].revoked_at = block.timestamp
    self.roles[site] = self.roles[site] & (ALL_ROLES ^ ROLE_SITE)
    log SiteRevoked(site=site, site_key=site_key, reason=reason, timestamp=block.timestamp)


@external
def approve_run(run_id: bytes32, config_hash: bytes32, code_hash: bytes32):
    assert self.sites[msg.sender].registered_at != 0, "caller is not a registered site"
    assert self.sites[msg.sender].revoked_at == 0, "caller is a revoked site"
    assert run_id != empty(bytes32), "run id is empty"
    assert self.approvals[msg.sender][run_id].approved_at == 0, "run already approved by this site"
    self.approvals[msg.sender][run_id] = Approval(
        config_hash=config_hash, code_hash=code_hash, approved_at=block.timestamp, withdrawn_at=0
    )
    log RunApproved(site=msg.sender, run_id=run_id, config_hash=config_hash, code_hash=code_hash, timestamp=block.timestamp)


@external
def withdraw_approval(run_id: bytes32):
    assert self.approvals[msg.sender][run_id].approved_at != 0, "run was not approved by this site"
    assert self.approvals[msg.sender][run_id].withdrawn_at == 0, "approval already withdrawn"
    self.approvals[msg.sender][run_id].withdrawn_at = block.timestamp
    log ApprovalWithdrawn(site=msg.sender, run_id=run_id, timestamp=block.timestamp)


@external
@view
def is_admitted(site: address, run_id: bytes32) -> bool:
    if self.sites[site].registered_at == 0 or self.sites[site].revoked_at != 0:
        return False
    approval: Approval = self.approvals[site][run_id]
    return approval.approved_at != 0 and approval.withdrawn_at == 0


@external
def issue_grant(grantee: address, scope: bytes32, expires_at: uint256):
    self._require_admin()
    assert grantee != empty(address), "grantee is the zero address"
    assert scope != empty(bytes32), "scope is empty"
    assert expires_at > block.timestamp, "grant would already be expired"
    self.grants[grantee][scope] = Grant(
        expires_at=expires_at, granted_at=block.timestamp, revoked_at=0, granted_by=msg.sender
    )
    log GrantIssued(grantee=grantee, scope=scope, expires_at=expires_at, by=msg.sender)


@external
def revoke_grant(grantee: address, scope: bytes32):
    self._require_admin()
    assert self.grants[grantee][scope].granted_at != 0, "no such grant"
    assert self.grants[grantee][scope].revoked_at == 0, "grant already revoked"
    self.grants[grantee][scope].revoked_at = block.timestamp
    log GrantRevoked(grantee=grantee, scope=scope, by=msg.sender)


@external
@view
def has_grant(grantee: address, scope: bytes32) -> bool:
    grant: Grant = self.grants[grantee][scope]
    return grant.granted_at != 0 and grant.revoked_at == 0 and block.timestamp < grant.expires_at


@internal
def _log_decision(actor: address, site_key: bytes32, subject: bytes32, action: bytes32, granted: bool, reason: bytes32, run_id: bytes32, round_index: uint256):
    assert action != empty(bytes32), "action is empty"
    who: address = actor
    if who == empty(address) and site_key != empty(bytes32):
        who = self.site_address[site_key]
    log AccessDecision(
        actor=who, action=action, run_id=run_id, site_key=site_key, subject=subject, granted=granted,
        reason=reason, round_index=round_index, recorder=msg.sender, timestamp=block.timestamp,
    )


@external
def record_decision(actor: address, site_key: bytes32, subject: bytes32, action: bytes32, granted: bool, reason: bytes32, run_id: bytes32, round_index: uint256):
    """
    @notice One access decision. `actor` zero + `site_key` set: the actor is the registered site.
    """
    self._require_coordinator()
    self._log_decision(actor, site_key, subject, action, granted, reason, run_id, round_index)


@external
def record_decisions(
    batch_id: bytes32,
    run_id: bytes32,
    round_index: uint256,
    actors: DynArray[address, MAX_BATCH],
    site_keys: DynArray[bytes32, MAX_BATCH],
    subjects: DynArray[bytes32, MAX_BATCH],
    actions: DynArray[bytes32, MAX_BATCH],
    granted: DynArray[bool, MAX_BATCH],
    reasons: DynArray[bytes32, MAX_BATCH],
):
    """
    @notice All access decisions of one round in one transaction; `batch_id` makes it idempotent.
    """
    self._require_coordinator()
    assert batch_id != empty(bytes32), "batch id is empty"
    assert self.batches[batch_id] == 0, "decision batch already recorded"
    count: uint256 = len(actors)
    assert count > 0, "empty decision batch"
    assert len(site_keys) == count and len(subjects) == count, "batch arrays differ in length"
    assert len(actions) == count and len(granted) == count and len(reasons) == count, "batch arrays differ in length"
    for i: uint256 in range(count, bound=MAX_BATCH):
        self._log_decision(actors[i], site_keys[i], subjects[i], actions[i], granted[i], reasons[i], run_id, round_index)
    self.batches[batch_id] = block.timestamp
    log DecisionBatch(batch_id=batch_id, run_id=run_id, round_index=round_index, count=count)
