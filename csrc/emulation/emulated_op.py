"""Build CUDA sources (``.cu``) as host C++ that runs on the CPU emulator.

The device code is compiled unmodified against the stand-in headers of
``csrc/emulation/include`` (placed first on the include path) and linked with
``emu_runtime.cpp``, which runs every CUDA thread as a fiber. The one source change, made on a
copy in the build directory, is :func:`rewrite_source`: kernel launches
``k<<<grid, block[, shmem[, stream]]>>>(args)`` become
``::emu::Launcher("k", grid, block[, shmem[, stream]]).run(k, args)``, and ``extern __shared__``
arrays point at the launch's dynamic shared memory.

Builds are cached under ``<cache>/<name>_<hash12>``; the hash covers every source and header
involved, the flags and defines, and the torch and Python versions, so a rerun only loads
the shared library. Importable by path (stdlib + torch only).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Optional

EMU_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = EMU_DIR / "include"
RUNTIME_SOURCE = EMU_DIR / "emu_runtime.cpp"
CSRC = EMU_DIR.parent
COMMON_DIR = CSRC / "common"

# -ffp-contract=off: `a * b + c` in device code must round twice, as nvcc --fmad=false and the
# CPU op do. -fno-strict-aliasing: device code routinely reads memory through another type
# (a bf16 array as uint2, floats as float4), which nvcc tolerates and g++ -O2 need not.
# -fstack-clash-protection: a frame larger than a fiber's guard area still faults on it.
CXXFLAGS = ["-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-fstack-clash-protection"]
# The ctypes self-test library is plain C++17. The torch extension keeps the dialect that
# torch.utils.cpp_extension uses for this torch version (C++20 for 2.13, as its nvcc builds of
# the real op): its headers warn under -std=c++17.
CTYPES_STD = "c++17"
HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc", ".inl")

_lock = threading.Lock()
_loaded: dict[str, object] = {}


# ---- Source rewrite ------------------------------------------------------------------------------

def _raw_string_prefix(src: str, i: int) -> bool:
    """Whether the quote at ``src[i]`` opens a raw string literal (R"x(...)x", u8R"(...)", ...)."""
    k = i
    while k > 0 and (src[k - 1].isalnum() or src[k - 1] == "_"):
        k -= 1
    return src[k:i] in ("R", "u8R", "uR", "UR", "LR")


def _blank_non_code(src: str) -> str:
    """``src`` with comments and string/character literals replaced by spaces (newlines kept),
    so that the scanners below only see code; offsets are unchanged."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == '"' and _raw_string_prefix(src, i):
            m = re.match(r'"([^()\\\s]{0,16})\(', src[i:])
            end = src.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
            blank(i, j)
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and src[i - 1].isdigit())):
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


_OPEN, _CLOSE = "([{", ")]}"


def _match_forward(code: str, i: int) -> int:
    """Index of the bracket closing the one at ``code[i]``, or -1."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] in _OPEN:
            depth += 1
        elif code[j] in _CLOSE:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _match_backward(code: str, i: int, close: str, open_: str) -> int:
    """Index of the ``open_`` matching the ``close`` at ``code[i]`` (parentheses skipped), or -1."""
    depth = 0
    j = i
    while j >= 0:
        ch = code[j]
        if ch == close:
            depth += 1
        elif ch == open_:
            depth -= 1
            if depth == 0:
                return j
        elif ch == ")" and close != ")":
            j = _match_backward(code, j, ")", "(")
            if j < 0:
                return -1
        j -= 1
    return -1


def _kernel_start(code: str, end: int) -> int:
    """Start of the kernel expression that ends at ``code[end - 1]``: a possibly qualified
    name with optional template arguments, or a parenthesised expression."""
    j = end - 1
    if code[j] == ")":
        return _match_backward(code, j, ")", "(")
    if code[j] == ">":
        j = _match_backward(code, j, ">", "<")
        if j < 0:
            return -1
        j -= 1
        while j >= 0 and code[j].isspace():
            j -= 1
    while j >= 0 and (code[j].isalnum() or code[j] == "_" or code[j] == ":"):
        j -= 1
    start = j + 1
    return start if start < end and not code[start].isdigit() else -1


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _c_string(text: str) -> str:
    return '"' + " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite_launches(source: str) -> str:
    """Turn every ``kernel<<<config>>>(args)`` into ``::emu::Launcher("kernel", config).run(kernel, args)``.

    ``config`` (grid, block and the optional shared-memory size and stream) is kept verbatim, so
    the Launcher constructor takes 2 to 4 of them; template-id kernels, launches spread over
    several lines and empty argument lists are handled. Line breaks are preserved, so compiler
    messages point at the original lines.
    """
    code = _blank_non_code(source)
    out: list[str] = []
    pos = 0
    search = 0
    while True:
        p = code.find("<<<", search)
        if p < 0:
            break
        k_end = p
        while k_end > 0 and code[k_end - 1].isspace():
            k_end -= 1
        k_start = _kernel_start(code, k_end) if k_end > 0 else -1
        if k_start < pos:
            raise ValueError(f"line {_line_of(source, p)}: cannot find the kernel name before '<<<'")
        # The configuration ends at the first '>>>' outside brackets.
        j, depth, cfg_end = p + 3, 0, -1
        while j < len(code):
            ch = code[j]
            if ch in _OPEN:
                depth += 1
            elif ch in _CLOSE:
                depth -= 1
            elif depth == 0 and code.startswith(">>>", j):
                cfg_end = j
                break
            j += 1
        if cfg_end < 0:
            raise ValueError(f"line {_line_of(source, p)}: '<<<' without a matching '>>>'")
        a = cfg_end + 3
        while a < len(code) and code[a].isspace():
            a += 1
        if a >= len(code) or code[a] != "(":
            raise ValueError(f"line {_line_of(source, p)}: kernel launch without an argument list")
        a_end = _match_forward(code, a)
        if a_end < 0:
            raise ValueError(f"line {_line_of(source, p)}: unbalanced kernel argument list")
        kernel = source[k_start:k_end]
        config = source[p + 3:cfg_end]
        args = source[a + 1:a_end]
        has_args = code[a + 1:a_end].strip() != ""
        # Newlines outside the kept pieces (e.g. between '>>>' and '('), to keep line numbers.
        dropped = source[k_end:p] + source[cfg_end:a] + ("" if has_args else args)
        out.append(source[pos:k_start])
        out.append(f"::emu::Launcher({_c_string(code[k_start:k_end])}, {config})"
                   f".run({kernel}{', ' + args if has_args else ''})" + "\n" * dropped.count("\n"))
        pos = search = a_end + 1
    out.append(source[pos:])
    return "".join(out)


_EXTERN_SHARED = re.compile(r"\b(?:extern\s+__shared__|__shared__\s+extern)\b")
_ATTRS = re.compile(r"__align__\s*\(\s*\w+\s*\)|alignas\s*\([^)]*\)|__attribute__\s*\(\(.*?\)\)")
_ARRAY_DECL = re.compile(r"^(?P<type>.*?[\w*&>)\s])\s*(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*$", re.S)
_NAMESPACE_BRACE = re.compile(r'(?:\bnamespace(?:\s+[\w:]+)?|\bextern\s+"C(?:\+\+)?")\s*$')


def _at_namespace_scope(source: str, code: str, pos: int) -> bool:
    """Whether ``pos`` is outside every function body (only namespace / extern "C" braces open)."""
    stack: list[bool] = []  # True for a namespace-like brace
    for m in re.finditer(r"[{}]", code[:pos]):
        if m.group() == "{":
            # extern "C" { ...: the string literal is blanked in `code`, so look at `source`.
            stack.append(bool(_NAMESPACE_BRACE.search(source[max(0, m.start() - 200):m.start()])))
        elif stack:
            stack.pop()
    return all(stack)


def rewrite_extern_shared(source: str) -> str:
    """Point ``extern __shared__ T name[];`` at the running block's dynamic shared memory:
    a local ``T* const name`` inside a function, a macro at namespace scope."""
    code = _blank_non_code(source)
    out: list[str] = []
    pos = 0
    macros: set[str] = set()
    for m in _EXTERN_SHARED.finditer(code):
        if m.start() < pos:
            continue
        semi = code.find(";", m.end())
        if semi < 0:
            raise ValueError(f"line {_line_of(source, m.start())}: unterminated extern __shared__ declaration")
        decl = _ATTRS.sub(" ", code[m.end():semi])
        d = _ARRAY_DECL.match(decl.strip())
        if not d:
            raise ValueError(f"line {_line_of(source, m.start())}: unsupported extern __shared__ declaration "
                             f"{source[m.start():semi + 1]!r} (expected 'extern __shared__ T name[];')")
        typ, name = " ".join(d.group("type").split()), d.group("name")
        newlines = "\n" * source.count("\n", m.start(), semi)
        memory = f"static_cast<{typ}*>(::emu::dynamic_shared_memory())"
        out.append(source[pos:m.start()])
        if _at_namespace_scope(source, code, m.start()):
            # A directive must start its line (only blanks before it).
            line_start = source.rfind("\n", 0, m.start()) + 1
            lead = "" if not source[line_start:m.start()].strip() else "\n"
            undef = f"#undef {name}\n" if name in macros else ""
            macros.add(name)
            out.append(f"{lead}{undef}#define {name} ({memory})" + newlines)
        else:
            out.append(f"{typ}* const {name} = {memory};" + newlines)
        pos = semi + 1
    out.append(source[pos:])
    return "".join(out)


def rewrite_source(source: str) -> str:
    """The whole source change for emulation: launches and ``extern __shared__`` arrays."""
    return rewrite_launches(rewrite_extern_shared(source))


# ---- Cached builds -------------------------------------------------------------------------------

def cache_root() -> Path:
    """The project's extension cache: where the JIT op builds go (stratopt_ds.ops.builder)."""
    if str(CSRC.parent) not in sys.path:  # run from a checkout without the package installed
        sys.path.insert(0, str(CSRC.parent))
    from stratopt_ds.ops.builder import cache_dir

    return cache_dir()


def _headers(directory: Path, recursive: bool = False) -> list[Path]:
    if not directory.is_dir():
        return []
    files = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in files if p.is_file() and p.name.endswith(HEADER_SUFFIXES))


def _digest(files: Iterable[Path], tags: Iterable[str]) -> str:
    h = hashlib.sha256()
    for tag in tags:
        h.update(tag.encode() + b"\0")
    for f in sorted(set(Path(p).resolve() for p in files)):
        h.update(str(f).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _define_flags(defines: Mapping[str, str]) -> list[str]:
    flags = []
    for key, value in sorted(defines.items()):
        if not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ValueError(f"invalid macro name {key!r}")
        flags.append(f"-D{key}" if value is None else f"-D{key}={value}")
    return flags


class _Plan:
    """Inputs, hash and build directory of one emulated build."""

    def __init__(self, name: str, cu_sources, cpp_sources, extra_include_dirs, defines, kind: str,
                 flags: list[str]):
        import torch  # the version goes into the hash

        self.cu = [Path(p).resolve() for p in cu_sources]
        self.cpp = [Path(p).resolve() for p in cpp_sources]
        missing = [str(p) for p in self.cu + self.cpp if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"emulated build {name}: sources not found: {missing}")
        stems = [p.stem for p in self.cu]
        if len(set(stems)) != len(stems):
            raise ValueError(f"emulated build {name}: .cu sources with the same name: {stems}")
        cu_dirs = list(dict.fromkeys(p.parent for p in self.cu))
        self.include_dirs = list(dict.fromkeys([INCLUDE_DIR, *map(Path, extra_include_dirs), *cu_dirs]))
        self.flags = flags + _define_flags(dict(defines or {}))
        deps = [*self.cu, *self.cpp, RUNTIME_SOURCE, Path(__file__), *_headers(INCLUDE_DIR, recursive=True),
                *_headers(COMMON_DIR)]
        for d in [*cu_dirs, *map(Path, extra_include_dirs)]:
            deps += _headers(Path(d))
        tags = [kind, name, torch.__version__, sys.version.split()[0], *self.flags,
                *map(str, self.include_dirs)]
        self.hash = _digest(deps, tags)
        self.module_name = f"{name}_{self.hash}"
        self.build_dir = cache_root() / self.module_name

    def write_rewritten(self) -> list[Path]:
        """The rewritten copies of the .cu sources, as <build_dir>/<stem>_emulated.cpp."""
        self.build_dir.mkdir(parents=True, exist_ok=True)
        copies = []
        for cu in self.cu:
            # #line: compiler messages point at the original file and lines.
            quoted = str(cu).replace("\\", "\\\\").replace('"', '\\"')
            text = f'#line 1 "{quoted}"\n' + rewrite_source(cu.read_text())
            dst = self.build_dir / f"{cu.stem}_emulated.cpp"
            if not dst.is_file() or dst.read_text() != text:
                tmp = dst.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(text)
                os.replace(tmp, dst)  # atomic: a concurrent build never sees half a file
            copies.append(dst)
        return copies


def _import_extension(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_extension(name: str, cu_sources: list[Path], cpp_sources: list[Path],
                    extra_include_dirs: list[Path], defines: Optional[Mapping[str, str]] = None,
                    verbose: bool = False):
    """Build (or load from the cache) a torch extension of emulated CUDA sources plus torch
    glue, with ``torch.utils.cpp_extension.load`` (ninja). Returns the loaded module, named
    ``<name>_<hash12>`` (TORCH_EXTENSION_NAME)."""
    from torch.utils import cpp_extension

    plan = _Plan(name, cu_sources, cpp_sources, extra_include_dirs, defines, "torch", list(CXXFLAGS))
    so = plan.build_dir / f"{plan.module_name}.so"
    with _lock:
        if plan.module_name in _loaded:
            return _loaded[plan.module_name]
        if so.is_file() and (plan.build_dir / "complete").is_file():
            module = _import_extension(plan.module_name, so)  # cached: no compiler, no ninja
        else:
            copies = plan.write_rewritten()
            module = cpp_extension.load(
                name=plan.module_name,
                sources=[str(p) for p in [*copies, *plan.cpp, RUNTIME_SOURCE]],
                extra_cflags=[shlex.quote(f) for f in plan.flags],
                extra_include_paths=[str(d) for d in plan.include_dirs],
                build_directory=str(plan.build_dir),
                with_cuda=False,
                verbose=verbose,
            )
            (plan.build_dir / "complete").write_text(plan.module_name + "\n")
        _loaded[plan.module_name] = module
        return module


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def build_ctypes_library(name: str, cu_sources: list[Path], cpp_sources: list[Path] = (),
                         extra_include_dirs: list[Path] = (), defines: Optional[Mapping[str, str]] = None,
                         verbose: bool = False, with_torch: bool = False) -> ctypes.CDLL:
    """Build (or load from the cache) emulated CUDA sources as a plain shared library for code
    that exports a C ABI (``extern "C"``); returns it loaded with ctypes. ``with_torch`` adds
    torch's headers and links libc10 (for the c10/cuda stand-ins), still without pybind."""
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = [*CXXFLAGS, f"-std={CTYPES_STD}", "-fPIC"]
    ldflags = ["-lpthread"]
    system_includes: list[str] = []
    if with_torch:
        import torch
        from torch.utils import cpp_extension

        lib_dir = Path(torch.__file__).parent / "lib"
        flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
        system_includes = cpp_extension.include_paths()
        ldflags += [f"-L{lib_dir}", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    plan = _Plan(name, cu_sources, cpp_sources, extra_include_dirs, defines,
                 f"ctypes|{cxx}|{version}|{system_includes}|{ldflags}", flags)
    lib = plan.build_dir / f"lib{name}.so"
    with _lock:
        if not lib.is_file():
            plan.build_dir.mkdir(parents=True, exist_ok=True)
            with open(plan.build_dir / "lock", "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building it too
                if not lib.is_file():
                    _compile_and_link(cxx, plan, lib, system_includes, ldflags, verbose)
        return ctypes.CDLL(str(lib))


def _compile_and_link(cxx: str, plan: _Plan, lib: Path, system_includes: list[str], ldflags: list[str],
                      verbose: bool) -> None:
    sources = [*plan.write_rewritten(), *plan.cpp, RUNTIME_SOURCE]
    includes = [f"-I{d}" for d in plan.include_dirs] + [f"-isystem{d}" for d in system_includes]
    jobs = []
    for i, src in enumerate(sources):
        obj = plan.build_dir / f"{i}_{src.stem}.o"
        jobs.append(([cxx, *plan.flags, *includes, "-c", str(src), "-o", str(obj)], obj))

    def run(cmd: list[str]) -> None:
        if verbose:
            print(" ".join(map(shlex.quote, cmd)), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulated build failed:\n{' '.join(map(shlex.quote, cmd))}\n{r.stderr}")

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(run, [cmd for cmd, _ in jobs]))
    fd, tmp = tempfile.mkstemp(dir=plan.build_dir, suffix=".so")
    os.close(fd)
    run([cxx, "-shared", "-o", tmp, *[str(obj) for _, obj in jobs], *ldflags])
    os.replace(tmp, lib)
