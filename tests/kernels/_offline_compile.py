"""Compile Triton kernels to an sm_90 cubin offline (no GPU), for CPU CI.

The Triton interpreter accepts code the real compiler rejects (a plain, non-constexpr Python global read inside
``@triton.jit`` is the known case), so tests that only run under ``TRITON_INTERPRET=1`` cannot catch it. The triton
wheel ships ptxas, so ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) on a machine without a GPU.

Use::

    cases = [Case("ppo_fwd/f32", "signalrl.kernels.ppo:_ppo_fwd_kernel", {"lp_ptr": "*fp32", ...},
                  {"HAS_REF": True, ...}, num_warps=4)]
    results = compile_cases(cases)          # {name: Result}; ONE subprocess compiles them all

``Case.signature`` gives the Triton type of every runtime argument ("*bf16", "*u8", "i32", "i64", "fp32", ...) and
``Case.constexprs`` the value of every ``tl.constexpr`` argument; together they must name every parameter of the
kernel (checked). ``Case.divisible`` lists the arguments that get 16-divisibility, as the launcher's specialization
gives a 16-byte aligned pointer or an integer divisible by 16 (default: every pointer). Scenarios (see
:func:`run_offline`) derive all of this from real launcher calls instead.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (``@triton.jit`` picks interpreter or compiler when a
module is imported, and the test process has it on) and with a fresh ``TRITON_CACHE_DIR``, so a cached artifact
never stands in for a compile. Each case is compiled on its own: a failure is recorded (with the compiler's message)
and the next case goes on. ``Result.ok`` also requires a non-empty cubin and PTX for sm_90.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kernel: str  # "package.module:attr" or "/path/to/file.py:attr"; an Autotuner/Heuristics is unwrapped
    signature: dict  # runtime argument -> Triton type
    constexprs: dict  # constexpr argument -> value
    num_warps: int | None = 4
    num_stages: int | None = 1
    divisible: tuple | None = None  # arguments given 16-divisibility (as the launcher does for aligned pointers
    # and integers divisible by 16); None: every pointer argument


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    shared: int = -1  # bytes of shared memory the kernel uses
    async_copies: int = 0  # cp.async global->shared copies in the TTGIR (software pipelining of a dot loop)
    cubin_bytes: int = 0
    ptx_target: str = ""
    registers: int = -1  # per thread, from the cubin (cuobjdump -res-usage); -1 if unknown
    local_bytes: int = -1  # per-thread local memory (register spills, stack arrays); -1 if unknown


def unavailable_reason() -> str | None:
    """Why the offline compile cannot run here (None when it can). Run in the test process: imports only triton."""
    try:
        import torch

        if torch.cuda.is_available():
            return "a CUDA device is present: the GPU tests compile and run the kernels there"
    except ImportError:
        pass
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton install has no offline compile API (ASTSource/GPUTarget): {e}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(TARGET[1])
    except Exception as e:  # noqa: BLE001 - no NVIDIA backend, or a triton without get_ptxas
        return f"cannot locate ptxas in this triton install: {type(e).__name__}: {e}"
    if tool is None or not getattr(tool, "path", None) or not os.path.isfile(tool.path):
        return "this triton install ships no ptxas"
    return None


@dataclasses.dataclass
class Report:
    results: dict  # case name -> Result
    cases: dict  # case name -> Case (the given ones and the ones captured from scenarios)
    origins: dict  # case name -> where it came from: "given", or the scenario and "launch"/"autotune"
    scenario_errors: dict  # scenario -> traceback of the exception it raised
    autotune_configs: dict  # "module:kernel" -> every config (as a dict) of an autotuner that wraps it


def compile_cases(cases, timeout: float = 900.0) -> dict[str, Result]:
    """Compile every case in one subprocess; -> {case name: Result}."""
    return run_offline(cases, (), timeout).results


def run_offline(cases=(), scenarios=(), timeout: float = 900.0) -> Report:
    """In ONE subprocess: run each scenario ("/path/file.py:function", called without arguments) with every kernel
    launch intercepted (``JITFunction.run`` / ``Autotuner.run`` record their arguments and return without running),
    turn each distinct launch into a Case (types and divisibility from Triton's own specialization of the actual
    arguments, so exactly what the launcher would compile on a GPU), then compile the given and the captured cases.

    An autotuned launch gives a case for the first config the autotuner's prune keeps for those arguments; and the
    first captured signature of every kernel that an autotuner wraps (module-level ``triton.autotune`` objects) is
    compiled with every tile of that autotuner (configs differing only in num_stages: the deepest one, see
    ``deepest_configs``), so configs only a large problem would reach are compiled too.
    While scenarios run ``TRITON_INTERPRET=1`` is set in the environment (after the kernel modules were imported
    compiled), so the op layer routes CPU tensors to the Triton backend. A case the subprocess never reached (it
    died or timed out) gets ok=False with the subprocess's stderr tail."""
    cases = list(cases)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("duplicate case names")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory(prefix="signal-offline-compile-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        out = os.path.join(tmp, "results.jsonl")
        spec = json.dumps(dict(cases=[dataclasses.asdict(c) for c in cases], scenarios=list(scenarios)))
        try:
            r = subprocess.run([sys.executable, __file__, out], input=spec, env=env, capture_output=True,
                               text=True, timeout=timeout, cwd=str(REPO_ROOT))
            tail = f"worker exit {r.returncode}; stderr tail:\n{r.stderr[-3000:]}"
        except subprocess.TimeoutExpired as e:
            tail = f"worker timed out after {timeout} s; stderr tail:\n{(e.stderr or b'')[-3000:]!r}"
        rep = Report({}, {c.name: c for c in cases}, {c.name: "given" for c in cases}, {}, {})
        if os.path.exists(out):
            with open(out) as f:
                for line in f:
                    d = json.loads(line)
                    kind = d.pop("kind")
                    if kind == "case":
                        c = Case(**d)
                        rep.cases[c.name] = c
                    elif kind == "origin":
                        rep.origins[d["name"]] = d["origin"]
                    elif kind == "result":
                        rep.results[d["name"]] = Result(**d)
                    elif kind == "scenario_error":
                        rep.scenario_errors[d["scenario"]] = d["error"]
                    elif kind == "autotune":
                        rep.autotune_configs[d["kernel"]] = d["configs"]
        else:
            rep.scenario_errors["<worker>"] = tail
    for n in rep.cases:
        rep.results.setdefault(n, Result(n, False, "not compiled: " + tail))
    for s in scenarios:
        if s not in rep.scenario_errors and not any(o.startswith(s + " ") for o in rep.origins.values()):
            rep.scenario_errors.setdefault(s, "launched no kernel (or never ran): " + tail)
    return rep


# ----------------------------------------------------------------------------------------------------- worker side


def _load(spec: str):
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py"):
        name = "_offline_compile_" + pathlib.Path(where).stem
        mod = sys.modules.get(name)
        if mod is None:
            sys.path.insert(0, str(pathlib.Path(where).parent))
            s = importlib.util.spec_from_file_location(name, where)
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    return getattr(mod, attr)


def _jit_of(fn):
    import triton

    while not isinstance(fn, triton.runtime.JITFunction):  # Autotuner / Heuristics wrap the JITFunction as .fn
        fn = fn.fn
    return fn


def _compile_one(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_of(_load(case["kernel"]))
    sig, const = case["signature"], case["constexprs"]
    params = list(fn.arg_names)
    unknown = (set(sig) | set(const)) - set(params)
    missing = set(params) - set(sig) - set(const)
    if unknown or missing or set(sig) & set(const):
        raise TypeError(f"case does not match {fn.__name__}{tuple(params)}: unknown {sorted(unknown)}, "
                        f"missing {sorted(missing)}, both {sorted(set(sig) & set(const))}")
    const_params = {p for p, c in zip(params, fn.params) if c.is_constexpr}
    if not const_params <= set(const):  # a runtime argument may be specialized too (the launcher does so for 1)
        raise TypeError(f"constexpr arguments of {fn.__name__} are {sorted(const_params)}, case gives {sorted(const)}")
    full = {p: (sig[p] if p in sig else "constexpr") for p in params}
    div = case["divisible"]
    div = [k for k, v in sig.items() if v.startswith("*")] if div is None else div
    attrs = {(params.index(k),): [["tt.divisibility", 16]] for k in div}
    src = ASTSource(fn, full, {(params.index(k),): v for k, v in const.items()}, attrs)
    opts = {k: case[k] for k in ("num_warps", "num_stages") if case[k] is not None}  # None: triton's default
    k = triton.compile(src, target=GPUTarget(*TARGET), options=opts)
    ptx = k.asm.get("ptx", "")
    target = next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), "")
    cubin = k.asm.get("cubin", b"")
    return dict(shared=int(k.metadata.shared), async_copies=k.asm.get("ttgir", "").count("async_copy_global_to_local"),
                cubin_bytes=len(cubin), ptx_target=target, **_resource_usage(cubin))


def _resource_usage(cubin: bytes) -> dict:
    """{registers, local_bytes} of the cubin's kernel from ``cuobjdump -res-usage`` (shipped beside ptxas in the
    triton wheel); {} when the tool is missing or prints something else."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(TARGET[1]).path), "cuobjdump")
    if not cubin or not os.path.isfile(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    if not (reg and local):
        return {}
    return dict(registers=int(reg.group(1)), local_bytes=int(local.group(1)))


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def deepest_configs(configs) -> list[dict]:
    """Autotune configs (as ``all_kwargs()`` dicts) that differ only in num_stages, reduced to the one with the most
    stages (the software-pipelined loop; fewer stages take a subset of the same lowering). Keeps the compile time of
    "every config" within CPU CI's budget."""
    best = {}
    for c in configs:
        kw = dict(c.all_kwargs() if hasattr(c, "all_kwargs") else c)
        key = json.dumps({k: v for k, v in kw.items() if k != "num_stages"}, sort_keys=True, default=str)
        if key not in best or (kw.get("num_stages") or 0) > (best[key].get("num_stages") or 0):
            best[key] = kw
    return list(best.values())


class _Capture:
    """Records kernel launches as cases (see run_offline)."""

    def __init__(self):
        self.cases = {}  # dedupe key -> case dict
        self.origins = {}
        self.autotuners = {}  # id(JITFunction) -> [Autotuner]
        self.first_sig = {}  # "module:kernel" -> (args, meta) of its first capture
        self.scenario = "?"
        self.coarse, self.facts, self.names = set(), set(), set()

    @staticmethod
    def constexpr_params(fn) -> set:
        return {p.name for p in fn.params if p.is_constexpr}

    @staticmethod
    def kernel_id(fn) -> str:
        return f"{fn.__module__}:{fn.__name__}"

    def add(self, fn, bound: dict, meta: dict, opts: dict, how: str):
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        sig, const, div = {}, {}, []
        for p in fn.params:
            v = meta[p.name] if p.name in meta else bound[p.name]
            if p.is_constexpr:
                const[p.name] = v
                continue
            ty, key = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize, True)
            if ty == "constexpr":
                const[p.name] = key
            else:
                sig[p.name] = ty
                if key == "D":
                    div.append(p.name)
        kid = self.kernel_id(fn)
        warps, stages = opts.get("num_warps"), opts.get("num_stages")
        # One case per (kernel, types, constexpr flags, warps, stages); a variant that differs only in what the
        # launcher specialized (16-divisibility, ints equal to 1) is kept when it shows something new for this
        # kernel: a set of arguments specialized to 1, or of arguments without divisibility, not compiled before.
        ones = frozenset(k for k in const if k not in self.constexpr_params(fn))
        nodiv = frozenset(k for k in sig if k not in div)
        types = {**sig, **{k: "int" for k in ones}}
        coarse = json.dumps([kid, types, {k: v for k, v in const.items() if k not in ones}, warps, stages],
                            sort_keys=True, default=str)
        facts = {(kid, "ones", ones), (kid, "nodiv", nodiv)}
        if coarse in self.coarse and facts <= self.facts:
            return
        self.coarse.add(coarse)
        self.facts |= facts
        key = json.dumps([kid, sig, const, div, warps, stages], sort_keys=True, default=str)
        if key in self.cases:
            return
        short = ",".join(f"{k}={v}" for k, v in const.items())
        types = ",".join(sig.values())
        name = f"{fn.__name__}[{short}]({types})w{warps}s{stages}" + (
            "-unaligned" if any(t.startswith("*") and k not in div for k, t in sig.items()) else "")
        while name in self.names:
            name += "'"
        self.names.add(name)
        self.cases[key] = dict(name=name, kernel=kid, signature=sig, constexprs=const, num_warps=warps,
                               num_stages=stages, divisible=tuple(div))
        self.origins[name] = f"{self.scenario} {how}"

    def launch(self, fn, args, kwargs, configs=None, how="launch"):
        import inspect

        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
        bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                                 if k in fn.arg_names})
        bound.apply_defaults()
        bound = dict(bound.arguments)
        kid = self.kernel_id(fn)
        first = kid not in self.first_sig
        if first:
            self.first_sig[kid] = (bound, kwargs)
        if configs is None:
            self.add(fn, bound, kwargs, opts, how)
        else:
            for c in configs[:1]:  # what the prune keeps first; every config is compiled once below
                kw = dict(c.all_kwargs())
                self.add(fn, bound, {**kwargs, **kw}, {k: kw.get(k) for k in _LAUNCH_OPTIONS}, how)
        if first:  # every tile of every autotuner that wraps this kernel, with the most stages it is tuned with
            for tuner in self.autotuners.get(id(fn), []):
                for kw in deepest_configs(tuner.configs):
                    meta = {k: v for k, v in kwargs.items() if k not in kw}
                    self.add(fn, bound, {**meta, **kw}, {k: kw.get(k) for k in _LAUNCH_OPTIONS}, "autotune")


def _worker(out_path: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    spec = json.load(sys.stdin)
    out = open(out_path, "w")

    def emit(kind, **d):
        out.write(json.dumps(dict(kind=kind, **d), default=str) + "\n")
        out.flush()

    cases = list(spec["cases"])
    if spec["scenarios"]:
        import triton
        from triton.runtime.autotuner import Autotuner

        cap = _Capture()
        for s in spec["scenarios"]:  # scenario modules may define kernels: import them compiled too
            _load(s.rsplit(":", 1)[0] + ":__name__")
        # import every kernel module compiled (not interpreted) before the op layer is told the interpreter is on
        for m in ("signalrl.kernels._common", "signalrl.kernels.kl", "signalrl.kernels.ppo", "signalrl.kernels.gae",
                  "signalrl.kernels.logprobs", "signalrl.kernels.linear_logprobs_tile", "signalrl.kernels.linear_logprobs_bwd",
                  "signalrl.kernels.linear_logprobs", "signalrl.kernels.linear_ppo"):
            importlib.import_module(m)
        for mod in list(sys.modules.values()):
            for obj in list(getattr(mod, "__dict__", {}).values()):
                if isinstance(obj, Autotuner):
                    inner = _jit_of(obj)
                    lst = cap.autotuners.setdefault(id(inner), [])
                    if obj not in lst:
                        lst.append(obj)
                        emit("autotune", kernel=cap.kernel_id(inner),
                             configs=[c.all_kwargs() for c in obj.configs])

        def jit_run(self, *args, grid, warmup, **kwargs):
            cap.launch(self, args, kwargs)

        def tuner_run(self, *args, **kwargs):
            fn = _jit_of(self)
            kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            configs = list(self.configs)
            prune = getattr(self, "early_config_prune", None)
            if prune is not None:
                named = dict(zip(self.arg_names, args))
                configs = list(prune(configs, named, **kw))
            cap.launch(fn, args, kwargs, configs, "autotuned launch")

        triton.runtime.JITFunction.run = jit_run
        Autotuner.run = tuner_run
        os.environ["TRITON_INTERPRET"] = "1"
        for s in spec["scenarios"]:
            cap.scenario = s
            try:
                _load(s)()
            except Exception:  # noqa: BLE001
                emit("scenario_error", scenario=s, error=traceback.format_exc()[-4000:])
        os.environ.pop("TRITON_INTERPRET", None)
        for c in cap.cases.values():
            emit("case", **c)
            emit("origin", name=c["name"], origin=cap.origins[c["name"]])
        cases += list(cap.cases.values())

    for case in cases:
        t0 = time.perf_counter()
        try:
            info = _compile_one(case)
            ok = info["cubin_bytes"] > 0 and info["ptx_target"].startswith(f"sm_{TARGET[1]}")
            res = dict(ok=ok, error="" if ok else f"no sm_{TARGET[1]} cubin: {info}", **info)
        except Exception as e:  # noqa: BLE001 - every failure is the result
            msg = "".join(traceback.format_exception_only(type(e), e))
            res = dict(ok=False, error=f"{msg}\n{traceback.format_exc()[-2500:]}")
        emit("result", name=case["name"], seconds=round(time.perf_counter() - t0, 3), **res)
    out.close()


if __name__ == "__main__":
    _worker(sys.argv[1])
