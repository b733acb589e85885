"""What algorithm="auto" assumes about the machine: a compute profile and a topology.

    import ringattn
    ringattn.set_auto_hardware("my_machine.json")           # what perf/model.py calibrate wrote
    ringattn.set_auto_hardware("h100", topology="pcie")     # a built-in profile on another topology
    with ringattn.auto_hardware("cpu"): ...                 # for a block of calls
    RINGATTN_AUTO_PROFILE=h100|cpu|path.json  RINGATTN_AUTO_TOPOLOGY=<cost_model preset>|path.json

auto (sequence_parallel.choose_algorithm) predicts each algorithm with ringattn.cost_model, whose
answer depends on how fast the device computes a block (ComputeProfile) and how the ranks are
linked (Topology). Which Hardware a call uses, first match wins:
  1. set_auto_hardware / auto_hardware in this process (None: unset);
  2. the environment: RINGATTN_AUTO_PROFILE (a built-in name or a JSON path) and/or
     RINGATTN_AUTO_TOPOLOGY (a cost_model.PRESETS name, or a JSON path holding a Topology or a
     calibration with one); one of the two alone keeps the device default's other half;
  3. by the device of q: CPU -> "cpu" (profiles/cpu_gloo.json: the math backend and gloo over
     loopback, measured on a 2-core VM like CI's), anything else -> "h100" (H100_BF16 cuDNN; topology "nvswitch" up to
     MESH_MAX_WORLD ranks, "inter_node" above).
A JSON profile is the file `perf/model.py calibrate` writes ({"compute": ComputeProfile,
"topology": Topology or null, "meta": ...}); its measured topology is used unless one is given.
Built-in topologies are ASSUMED spec-sheet numbers (cost_model.PRESETS); "shared_gpu" is W ranks
sharing one GPU over CudaIpcTransport.

Every rank must assume the same hardware, or ranks could pick different algorithms and deadlock:
each auto call puts the chosen Hardware's fingerprint (crc32 of its profile and topology) in the
signature every call exchanges, and ranks that differ get the same ValueError naming what each
assumed. A bad setting (unknown name, unreadable JSON) is reported the same way on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
import zlib
from importlib import resources

from ringattn import cost_model as cm

# GPUs in one NVLink/NVSwitch node: the default topology is "nvswitch" up to this world size and
# "inter_node" (8 GPUs per node) above it.
MESH_MAX_WORLD = 8
ENV_PROFILE = "RINGATTN_AUTO_PROFILE"
ENV_TOPOLOGY = "RINGATTN_AUTO_TOPOLOGY"


@dataclasses.dataclass(frozen=True, eq=False)
class Hardware:
    """A compute profile and a topology (None: "nvswitch" for W <= MESH_MAX_WORLD, "inter_node"
    above; or a cost_model.PRESETS name; or a cost_model.Topology). Equal (and hashed) by its
    fingerprint, so it keys auto's caches."""

    profile: cm.ComputeProfile
    topology: cm.Topology | str | None = None
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.profile, cm.ComputeProfile):
            raise TypeError(f"profile must be a cost_model.ComputeProfile, got {type(self.profile).__name__}")
        if self.topology is not None:
            cm.get_topology(self.topology)  # (an unknown preset name raises here)
        topo = self.topology.to_json() if isinstance(self.topology, cm.Topology) else self.topology
        doc = json.dumps({"profile": self.profile.to_json(), "topology": topo}, sort_keys=True, default=str)
        object.__setattr__(self, "fingerprint", zlib.crc32(doc.encode()))
        if not self.name:
            object.__setattr__(self, "name", f"{self.profile.name} on {self.topology_name}")

    @property
    def topology_name(self) -> str:
        if self.topology is None:
            return f"nvswitch (W <= {MESH_MAX_WORLD}) / inter_node"
        return self.topology if isinstance(self.topology, str) else self.topology.kind

    def topology_for(self, world: int) -> cm.Topology | str:
        if self.topology is None:
            return "nvswitch" if world <= MESH_MAX_WORLD else "inter_node"
        return self.topology

    def with_topology(self, topology) -> "Hardware":
        return _with_topology(self, topology) if topology is not None else self

    def __eq__(self, other):
        return isinstance(other, Hardware) and other.fingerprint == self.fingerprint

    def __hash__(self):
        return self.fingerprint


@functools.lru_cache(maxsize=64)
def _with_topology(hw: Hardware, topology) -> Hardware:
    # cached: every auto call asks (twice); a new Hardware serialises its whole profile to hash it
    return Hardware(hw.profile, topology)


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot read {path!r} as JSON ({e})") from None


def _topology_from_doc(doc, path: str, what: str) -> cm.Topology | None:
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: {path!r} holds a JSON {type(doc).__name__}, not an object")
    topo = doc.get("topology", doc if "kind" in doc else None)
    if topo is None:
        return None
    try:
        return cm.Topology.from_json(topo)
    except TypeError as e:
        raise ValueError(f"{what}: {path!r} does not hold a cost_model.Topology ({e})") from None


@functools.lru_cache(maxsize=16)
def _from_file(path: str, mtime: float) -> Hardware:
    what = "auto hardware profile"
    doc = _load_json(path, what)
    if not isinstance(doc, dict) or "compute" not in doc:
        raise ValueError(f"{what}: {path!r} is not what perf/model.py calibrate writes (no 'compute' entry)")
    try:
        prof = cm.ComputeProfile.from_json(doc["compute"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: {path!r} holds no readable compute profile ({e!r})") from None
    return Hardware(prof, _topology_from_doc(doc, path, what), name=f"{prof.name} ({os.path.basename(path)})")


@functools.lru_cache(maxsize=1)
def _cpu_gloo() -> Hardware:
    doc = json.loads(resources.files("ringattn").joinpath("profiles/cpu_gloo.json").read_text())
    return Hardware(cm.ComputeProfile.from_json(doc["compute"]), cm.Topology.from_json(doc["topology"]),
                    name="cpu_gloo (2-core VM, gloo over loopback)")


def builtin(name: str) -> Hardware:
    """"h100": cost_model.H100_BF16 on the default topology rule; "cpu": ringattn/profiles/cpu_gloo.json
    (math kernel, gloo over loopback, a 2-core VM) with its measured topology."""
    if name == "h100":
        return H100
    if name == "cpu":
        return _cpu_gloo()
    raise KeyError(name)


H100 = Hardware(cm.H100_BF16, None, name="h100_bf16 (cuDNN) on nvswitch (W <= 8) / inter_node")
BUILTIN = ("h100", "cpu")


def builtin_name(fingerprint: int) -> str | None:
    """The built-in whose fingerprint this is (None: another Hardware)."""
    return next((n for n in BUILTIN if builtin(n).fingerprint == fingerprint), None)


def resolve_profile(profile) -> Hardware:
    """A Hardware from a Hardware, a cost_model.ComputeProfile (default topology rule), a built-in
    name (BUILTIN) or the path of a JSON that perf/model.py calibrate wrote (with its topology)."""
    if isinstance(profile, Hardware):
        return profile
    if isinstance(profile, cm.ComputeProfile):
        return Hardware(profile)
    if isinstance(profile, (str, os.PathLike)):
        key = os.fspath(profile)
        if key in BUILTIN:
            return builtin(key)
        if os.path.exists(key):
            return _from_file(os.path.abspath(key), os.path.getmtime(key))
        raise ValueError(f"auto hardware profile {key!r}: neither a built-in ({', '.join(BUILTIN)}) nor "
                         "an existing JSON file (perf/model.py calibrate writes one)")
    raise TypeError(f"profile must be a Hardware, a cost_model.ComputeProfile, one of {BUILTIN} or a JSON "
                    f"path, got {type(profile).__name__}")


def resolve_topology(topology) -> cm.Topology | str | None:
    """None, a cost_model.PRESETS name, a Topology, or a JSON path holding one (or a calibration with one)."""
    if topology is None or isinstance(topology, cm.Topology):
        return topology
    if not isinstance(topology, (str, os.PathLike)):
        raise TypeError(f"topology must be None, a cost_model preset name, a Topology or a JSON path, "
                        f"got {type(topology).__name__}")
    path = os.fspath(topology)
    if path in cm.PRESETS:
        return path
    if not os.path.exists(path):
        raise ValueError(f"auto hardware topology {path!r}: neither a cost_model preset "
                         f"({', '.join(sorted(cm.PRESETS))}) nor an existing JSON file")
    topo = _topology_from_doc(_load_json(path, "auto hardware topology"), path, "auto hardware topology")
    if topo is None:
        raise ValueError(f"auto hardware topology: {path!r} holds no topology")
    return topo


_configured: tuple | None = None  # (Hardware or None: the device default, topology or None)


def set_auto_hardware(profile=None, *, topology=None):
    """Make algorithm="auto" in this process predict with `profile` (resolve_profile; None: the
    device default) on `topology` (resolve_topology; None: the profile's own). Both None: back to
    the environment / device default. Returns the previous setting (for restoring it). Every
    rank of a group must make the same setting (checked at each auto call)."""
    global _configured
    prev = _configured
    if profile is None and topology is None:
        _configured = None
    else:
        _configured = (None if profile is None else resolve_profile(profile), resolve_topology(topology))
    return prev


@contextlib.contextmanager
def auto_hardware(profile=None, *, topology=None):
    """set_auto_hardware for the calls inside the block (the previous setting is restored after it)."""
    global _configured
    prev = set_auto_hardware(profile, topology=topology)
    try:
        yield
    finally:
        _configured = prev


def device_default(device_type: str) -> Hardware:
    return _cpu_gloo() if device_type == "cpu" else H100


# The GPUs the default profile was fitted on (cost_model.H100_BF16: an H100 80GB HBM3, SXM)
FITTED_GPUS = ("H100",)
_warned: set = set()


def warn_if_unfitted(gpu_name: str) -> bool:
    """Warn once per GPU name when auto uses the H100 fit on another GPU (True: warned now)."""
    if any(g in gpu_name for g in FITTED_GPUS) or gpu_name in _warned:
        return False
    _warned.add(gpu_name)
    warnings.warn(
        f"ringattn: algorithm='auto' predicts with the H100 cost profile, but this GPU is {gpu_name!r}: its "
        "picks between ring / token_ring / ulysses may not be the fastest here. Fit this GPU "
        "(perf/bench_block_attention.py and perf/bench_ops.py, then perf/model.py calibrate --block-csv ... "
        f"--ops-csv ... --out mine.json) and set {ENV_PROFILE}=mine.json (and {ENV_TOPOLOGY} if it is not an "
        "NVSwitch node), or pass algorithm= explicitly (docs/sequence_parallel.md, 'Telling auto your hardware').",
        RuntimeWarning, stacklevel=3)
    return True


def current(device_type: str = "cuda", device=None) -> Hardware:
    """The Hardware an auto call on a `device_type` tensor uses now (module docstring: set > env >
    device). Raises ValueError for a bad environment setting (naming the variable). device: the
    tensor's torch.device; on a GPU the default profile was not fitted to, warns once
    (warn_if_unfitted)."""
    hw = _current(device_type)
    if device_type == "cuda" and device is not None and hw.profile is cm.H100_BF16:
        warn_if_unfitted(_gpu_name(device))
    return hw


def _current(device_type: str) -> Hardware:
    if _configured is not None:
        hw, topo = _configured
        return (hw or device_default(device_type)).with_topology(topo)
    prof_env, topo_env = os.environ.get(ENV_PROFILE), os.environ.get(ENV_TOPOLOGY)
    if not prof_env and not topo_env:
        return device_default(device_type)
    # cached per setting (and the files' mtimes): resolving reads and hashes JSON, on every call otherwise
    return _from_env(prof_env, topo_env, device_type, _mtime(prof_env), _mtime(topo_env))


def _mtime(path: str | None) -> float | None:
    try:
        return os.path.getmtime(path) if path else None
    except OSError:
        return None  # (a built-in or preset name, or a missing file: resolving says which)


@functools.lru_cache(maxsize=16)
def _from_env(prof_env, topo_env, device_type: str, _prof_mtime, _topo_mtime) -> Hardware:
    try:
        hw = resolve_profile(prof_env) if prof_env else device_default(device_type)
        return hw.with_topology(resolve_topology(topo_env or None))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ENV_PROFILE}={prof_env!r} / {ENV_TOPOLOGY}={topo_env!r}: {e}") from None


@functools.lru_cache(maxsize=64)
def _gpu_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)
