"""What runs inside the sandbox's interpreter (`rollout.tools.python_sandbox`): the source of
these two functions is passed to `python -I -c`, so they import everything they use inside
themselves and rely on nothing at module level. They live apart from the parent's side so each
file stays readable; nothing imports them to call them in this process.
"""

from __future__ import annotations


def _child_guard(scratch: str, nofile: int, cpu: int, memory: int, fsize: int) -> tuple[type, type]:
    """Set the limits and install the audit hook; returns the two refusal exception types.

    All state the hook needs lives in its closure, and the closure is reachable only through the
    hook, which only the interpreter references: the model can rebind any module attribute or
    builtin, but not these. Nothing the hook does calls the model's code (only exact built-in
    types are inspected, so no overridden method can run inside it), and a traceback frame of the
    hook is refused, so its locals cannot leak out through an exception either.
    """
    import _imp
    import _posixsubprocess
    import _thread
    import os
    import posix
    import resource
    import signal
    import sys
    import sysconfig
    import types

    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                            (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, nofile, nofile),
                            (resource.RLIMIT_NPROC, 0, 0), (resource.RLIMIT_CORE, 0, 0)):  # fmt: skip
        ceiling = resource.getrlimit(res)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(res, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead of killing

    class NotAllowed(PermissionError):
        pass

    class ImportNotAllowed(ImportError):
        pass

    getcwd, stat, readlink, create_builtin = posix.getcwd, posix.stat, posix.readlink, _imp.create_builtin
    namespace = types.SimpleNamespace
    str_, bytes_, int_, list_, tuple_, type_, repr_, len_ = str, bytes, int, list, tuple, type, repr, len
    issubclass_ = issubclass
    exception_, oserror_, traceback_type, everything = Exception, OSError, types.TracebackType, slice(None)
    busy, codes, writes = [False], [], [0]

    def refuse(what):
        def refused(*args, **kwargs):
            raise NotAllowed(what)

        return refused

    def absolute(path):  # made absolute as text, links not followed; None for '..', which could climb out via a link
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                return None
            if part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def resolve(path):  # an exact absolute str, "fd" for a descriptor, or None for anything refused
        t = type_(path)
        if t is int_:
            return "fd"
        if path is None:
            return getcwd()
        if issubclass_(t, str_):
            return absolute(str_.__getitem__(path, everything))
        if issubclass_(t, bytes_):
            return absolute(bytes_.decode(bytes_.__getitem__(path, everything), "utf-8", "surrogateescape"))
        return None

    def fd_path(fd):
        try:
            return absolute(readlink(f"/proc/self/fd/{fd}"))
        except oserror_:
            return None

    def shown(value):
        t = type_(value)
        ok = t is str_ or t is bytes_ or t is int_
        if t is list_ or t is tuple_:
            ok = True
            for v in value:
                if type_(v) is not str_ and type_(v) is not bytes_ and type_(v) is not int_:
                    ok = False
        r = repr_(value) if ok else "..."
        return r if len_(r) <= 100 else r[:97] + "..."

    libs = sysconfig.get_paths()
    raw = {p for p in sys.path if p} | {libs[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots = {absolute(r) for r in raw} | {absolute(os.path.realpath(r)) for r in raw}
    roots.discard(None)
    roots.discard("/")
    home = absolute(scratch)
    read_files = frozenset(roots | {home, "/dev/null", "/dev/zero", "/dev/urandom"})
    read_dirs = tuple(r + "/" for r in roots) + (home + "/",)
    write_files, write_dir = frozenset({home, "/dev/null"}), home + "/"
    af_unix = 1  # socket.AF_UNIX on Linux, without importing socket here
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    path_events = {"os.listdir": False, "os.scandir": False, "os.getxattr": False, "os.listxattr": False,
                   "os.mkdir": True, "os.rmdir": True, "os.remove": True, "os.rename": True, "os.chmod": True,
                   "os.chown": True, "os.utime": True, "os.truncate": True, "os.setxattr": True,
                   "os.removexattr": True, "shutil.rmtree": True, "os.chdir": True}  # event: writes?  # fmt: skip
    denied = frozenset({"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.link", "os.symlink",
                        "os.mkfifo", "os.mknod", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
                        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
                        "cpython.PyInterpreterState_New", "sqlite3.load_extension",
                        "sqlite3.enable_load_extension"})  # fmt: skip
    denied_prefixes = ("os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "ctypes.", "syslog.", "pty.")
    blocked = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_sqlite3", "_dbm",
                         "_gdbm", "readline", "_curses", "_curses_panel", "_tkinter", "pwd", "grp", "spwd", "nis",
                         "syslog", "_posixshmem", "_multiprocessing", "_xxsubinterpreters",
                         "_xxinterpchannels"})  # fmt: skip
    loaded = frozenset(sys.modules)  # a fresh copy of one of these would be free of the patches below

    def check_import(name):
        name = str_.__getitem__(name, everything)
        if name in blocked or name.partition(".")[0] in blocked or name.startswith(("_test", "_xx")):
            raise ImportNotAllowed(f"import {name}", name=name)
        return name

    def check(event, args):
        if event == "open":
            path, _, flags = args
            p = resolve(path)
            write = type_(flags) is not int_ or flags & write_flags
            if p is None or p != "fd" and write and not (p in write_files or p.startswith(write_dir)):
                raise NotAllowed(f"open({shown(path)})")
            if p == "fd":
                return
            if write:
                writes[0] += 1
                if writes[0] > 128:
                    raise NotAllowed("opening more than 128 files for writing")
            elif not (p in read_files or p.startswith(read_dirs)):
                raise NotAllowed(f"open({shown(path)})")
            elif not (p == home or p.startswith(write_dir)):
                try:  # a directory fd outside the scratch dir would let dir_fd= reach past these checks
                    directory = stat(p).st_mode & 0o170000 == 0o040000
                except oserror_:
                    directory = False
                if directory:
                    raise NotAllowed(f"open({shown(path)}) of a directory")
        elif event == "import":
            check_import(args[0])
        elif event in path_events:
            write = path_events[event]
            paths = args[: 2 if event == "os.rename" else 1]
            for path in paths:
                p = resolve(path)
                if p == "fd" and write:  # fchmod and the like on a read-only fd of a library file
                    p = None if event == "os.chdir" else fd_path(path)
                ok = p is not None and (p == "fd" or p in write_files or p.startswith(write_dir)
                                        or not write and (p in read_files or p.startswith(read_dirs)))  # fmt: skip
                if not ok:
                    raise NotAllowed(f"{event}({shown(path)})")
        elif event == "object.__getattr__":
            obj, name = args
            if type_(obj) is traceback_type and type_(name) is str_ and name == "tb_frame":
                if obj.tb_frame.f_code in codes[0]:
                    raise NotAllowed("a traceback frame of the sandbox itself")
        elif event == "vespo.create_builtin":
            name, box = args
            name = check_import(name)
            if name in loaded:
                raise ImportNotAllowed(f"import {name} again", name=name)
            if type_(box) is list_:
                box.append(create_builtin(namespace(name=name)))
        elif event == "socket.__new__" and type_(args[1]) is int_ and args[1] == af_unix:
            return  # unconnected local sockets: asyncio's self-pipe; connect and bind are refused below
        elif event.startswith("socket.") and event != "socket.gethostname":
            raise NotAllowed("network access")
        elif event in denied or event.startswith(denied_prefixes):
            argument = args[1] if event == "subprocess.Popen" else args[0] if event == "os.system" else None
            raise NotAllowed(f"{event}({shown(argument)})" if argument is not None else event)

    def hook(event, args):
        if busy[0] or type_(args) is not tuple_ or not issubclass_(type_(event), str_):
            return
        busy[0] = True
        try:
            check(str_.__getitem__(event, everything), args)
        except (NotAllowed, ImportNotAllowed):
            raise
        except exception_ as e:  # malformed arguments (a model can call sys.audit itself): refuse
            raise NotAllowed(f"{str_.__getitem__(event, everything)} ({type_(e).__name__})") from None
        finally:
            busy[0] = False

    def guarded_create_builtin(spec):  # the original is only in the hook's closure; it checks the name
        box = []
        sys.audit("vespo.create_builtin", spec.name, box)
        if not box:
            raise ImportNotAllowed(f"import {spec.name}")
        return box[0]

    # unaudited ways to start processes or threads or to reach other processes; the originals stay
    # out of reach because re-creating these modules is refused
    _posixsubprocess.fork_exec = refuse("subprocess")
    _thread.start_new_thread = _thread.start_new = refuse("threads")
    posix.pidfd_open = os.pidfd_open = refuse("os.pidfd_open")
    _imp.create_builtin = guarded_create_builtin
    guard = (refuse, refuse("x"), absolute, resolve, fd_path, shown, check_import, check, hook, guarded_create_builtin)
    codes.append(frozenset(f.__code__ for f in guard))
    sys.addaudithook(hook)
    return NotAllowed, ImportNotAllowed


def _child_main() -> None:
    """Read the program, guard, run it, and tell the parent how it ended on the status fd."""
    import errno
    import linecache
    import posix
    import sys
    import traceback

    scratch, status_fd, cpu, memory, fsize, nofile = sys.argv[1], *map(int, sys.argv[2:7])
    source = sys.stdin.buffer.read()
    del sys.argv[1:]
    sys.dont_write_bytecode = True
    posix.chdir(scratch)
    text = source.decode("utf-8", "replace")
    linecache.cache["<code>"] = (len(text), None, text.splitlines(True), "<code>")
    write, exit_ = posix.write, posix._exit
    refusals = _child_guard(scratch, nofile, cpu, memory, fsize)
    status = "ok"
    try:
        exec(compile(source, "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what the interpreter does with sys.exit("message")
        status = f"exit {e.code if isinstance(e.code, int) else 0 if e.code is None else 1}"
    except MemoryError:
        status = "memory"
    except BaseException as e:  # noqa: BLE001 - every ending is reported to the parent
        cause, depth = e, 0
        while cause is not None and depth < 8 and not isinstance(cause, refusals):
            cause, depth = cause.__cause__ or cause.__context__, depth + 1
        if isinstance(cause, refusals):
            status = f"denied {cause.args[0]}"
        elif isinstance(e, OSError) and e.errno == errno.EFBIG:
            status = "fsize"
        else:
            status = "error"
            try:
                traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            except BaseException:  # noqa: BLE001 - a traceback the guard will not show: the last line still helps
                print(f"{type(e).__name__}: {e}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed stream loses only its output
            pass
    write(status_fd, status.encode("utf-8", "replace")[:4000])
    exit_(0)
