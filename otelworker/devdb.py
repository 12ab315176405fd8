"""A private PostgreSQL cluster for ``make run`` (DATABASE_URL unset) and the test session.

The cluster lives in one data directory: ``initdb`` on first use (trust auth, superuser
``postgres``, UTF8), then ``pg_ctl start -w`` listening on TCP only. Server settings are
written to ``otelworker.conf`` in the data directory (included from postgresql.conf), so a
restart reuses the previous port and ``pg_ctl -D DIR start`` by hand behaves the same.
``fsync`` stays on: durability is the product, even on a dev box.

Several processes share one cluster (``make run`` in one terminal, ``batches`` or
``replay`` in another, the workers of ``hypercorn -w N``): each *attaches* with
:meth:`EmbeddedPostgres.attach`, which starts the cluster only when none runs on that data
directory, and *detaches* with :meth:`EmbeddedPostgres.detach`. Each attached process
holds a shared ``flock`` on ``.<datadir>.users`` beside the data directory (the kernel
drops it when the process dies, ``kill -9`` included); the last one out, the one that can
take that lock exclusively, stops the cluster, and only if an otelworker process started
it (its postmaster PID is recorded in ``.<datadir>.started``): a cluster started by hand
with ``pg_ctl`` is never stopped. A ``postmaster.pid`` left by a killed server whose PID
now names another program is detected, reported and removed before the start.

PostgreSQL refuses to run as root; as root the cluster runs as the unprivileged system
user ``pgserver`` (created if missing, as the ``pgserver`` wheel does), which then owns
the data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["EmbeddedPostgres", "find_bindir"]

SUPERUSER = "postgres"
#: The system user the server runs as when we are root.
SYSTEM_USER = "pgserver"
CONF_NAME = "otelworker.conf"
LOG_NAME = "postgresql.log"
#: Start attempts while a killed server's backends still hold its shared memory.
_SHMEM_RETRIES = 20
_REQUIRED = ("initdb", "pg_ctl", "postgres")
_TIMEOUT_S = 60


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in _REQUIRED)


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    In order: ``$OTELWORKER_PG_BINDIR``; the ``pgserver`` wheel's bundled binaries;
    ``pg_config --bindir``; the newest ``/usr/lib/postgresql/*/bin``.
    """
    env = os.environ.get("OTELWORKER_PG_BINDIR")
    if env:
        if not _has_server(Path(env)):
            raise RuntimeError(f"OTELWORKER_PG_BINDIR={env} lacks one of {', '.join(_REQUIRED)}")
        return Path(env)
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations)), "pginstall", "bin"))
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)[::-1]
    ]
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found. Install the "
        "embedded extra (pip install 'otelworker[embedded]', which brings the pgserver "
        "wheel), or install PostgreSQL (e.g. apt-get install postgresql), or point "
        "OTELWORKER_PG_BINDIR at its bin directory; or set DATABASE_URL to use a server."
    )


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the postmaster does
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    """``kill -0`` semantics, as PostgreSQL's own lock file check: a zombie counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` runs a PostgreSQL server (Linux /proc; assumed so elsewhere).

    After a reboot or a long time, the PID in a killed server's ``postmaster.pid`` can
    name another program; PostgreSQL would then refuse to start ("lock file already
    exists").
    """
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _pid_alive(pid)
    except OSError:
        return True
    return comm.startswith("postgres")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(entry.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.parent.name))
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no server log: {exc})"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _grant_traversal(path: Path) -> None:
    """o+x on every ancestor of ``path`` so that another user can reach it."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _grant_read_tree(root: Path) -> None:
    """o+r on files, o+rx on directories and executables under ``root``."""
    for dirpath, _dirs, files in os.walk(root):
        Path(dirpath).chmod(Path(dirpath).stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            file = Path(dirpath, name)
            mode = file.lstat().st_mode
            if stat.S_ISREG(mode):
                file.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, reachable over TCP at ``host:port``."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, port: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.log_file = self.data_dir / LOG_NAME
        self._port = port
        self._requested_port = port
        self._bindir: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._users_fd: int | None = None
        #: Set by :meth:`attach`: whether this process started the cluster.
        self.started_here = False
        if os.geteuid() == 0:
            self._user = _ensure_system_user(SYSTEM_USER)

    # --- public API ------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        port = self._port if self._port is not None else self._pid_file_port()
        if port is None:
            raise RuntimeError(f"the cluster in {self.data_dir} has not been started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{SUPERUSER}@{host}:{port}/postgres"

    @property
    def running(self) -> bool:
        pid = self._pid_file_field(0)
        return pid is not None and _pid_alive(int(pid)) and _is_postgres(int(pid))

    @property
    def attached(self) -> bool:
        return self._users_fd is not None

    def attach(self) -> str:
        """Use the cluster: start it unless one already runs on the data directory.

        Returns its DSN. Pair with :meth:`detach`; a process that dies without detaching
        leaves the cluster running for the others (and for its own restart).
        """
        with self._lock():
            if self._users_fd is None:
                fd = os.open(self._side_file("users"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._users_fd = fd
            try:
                was_running = self.running
                dsn = self._start_locked()
            except BaseException:
                self._release_users()
                raise
            self.started_here = not was_running
            if self.started_here:
                self._side_file("started").write_text(f"{self._pid_file_field(0)}\n")
            return dsn

    def detach(self) -> bool:
        """Stop using the cluster; the last user out stops it if otelworker started it.

        Returns whether the cluster was stopped here. No-op unless attached.
        """
        if self._users_fd is None:
            return False
        with self._lock():
            self._release_users()
            fd = os.open(self._side_file("users"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # another process still uses it
                if not (self.running and self._started_by_otelworker()):
                    return False
                self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(_TIMEOUT_S))
                self._side_file("started").unlink(missing_ok=True)
                return True
            finally:
                os.close(fd)

    def _release_users(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)  # drops the shared lock
            self._users_fd = None

    def _side_file(self, what: str) -> Path:
        """``.<datadir>.<what>`` beside the data directory (the data directory itself
        belongs to the server's user)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        return self.data_dir.parent / f".{self.data_dir.name}.{what}"

    def _started_by_otelworker(self) -> bool:
        try:
            recorded = self._side_file("started").read_text().strip()
        except OSError:
            return False
        return recorded != "" and recorded == self._pid_file_field(0)

    def start(self) -> str:
        """Start the cluster (creating it if needed) and return its DSN; no-op if running.

        Unlike :meth:`attach`, this does not register a user: the caller owns the cluster
        and stops it with :meth:`stop` (the test session's private clusters).
        """
        with self._lock():
            return self._start_locked()

    def _start_locked(self) -> str:
        if self.running:
            self._wait_ready()
            self._port = self._pid_file_port()
            return self.dsn
        self._clear_stale_pid_file()
        self._prepare()
        attempts = 1 if self._requested_port is not None else 3
        attempt = 0
        shmem_waits = 0
        while True:
            attempt += 1
            self._port = self._choose_port()
            self._write_conf(self._port)
            try:
                self._pg_ctl("start", "-w", "-t", str(_TIMEOUT_S), "-l", str(self.log_file))
                return self.dsn
            except RuntimeError as exc:
                if "shared memory block is still in use" in str(exc) and (
                    shmem_waits < _SHMEM_RETRIES
                ):
                    # A killed server's backends notice their postmaster's death within
                    # moments and exit; until then its shared memory is still attached.
                    shmem_waits += 1
                    attempt -= 1
                    time.sleep(0.25)
                    continue
                # an automatically chosen port may have been taken meanwhile: try another
                if attempt >= attempts or _port_is_free(self.host, self._port):
                    raise

    def _clear_stale_pid_file(self) -> None:
        """A ``postmaster.pid`` whose PID is alive but not a PostgreSQL server is stale
        (a killed server's PID reused): PostgreSQL would refuse to start. Remove it."""
        raw = self._pid_file_field(0)
        if raw is None:
            return
        pid = int(raw)
        if _pid_alive(pid) and not _is_postgres(pid):
            from otelworker.logs import log_event

            log_event(
                "embedded_database_stale_pid_file",
                "removed a postmaster.pid naming a process that is not PostgreSQL",
                reason="pid_reused",
                data_dir=str(self.data_dir),
                pid=pid,
            )
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode -w``; no-op if the cluster is not running."""
        with self._lock():
            if self.running:
                self._pg_ctl("stop", "-m", mode, "-w", "-t", str(_TIMEOUT_S))

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a host crash, short of the page cache).

        The next :meth:`start` runs crash recovery.
        """
        raw = self._pid_file_field(0)
        if raw is None or not _pid_alive(pid := int(raw)):
            return
        # Backends outlive a killed postmaster briefly and keep its shared memory attached,
        # which would block the restart: kill them all, like a host crash would.
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + _TIMEOUT_S
        while any(_pid_alive(victim) for victim in victims):  # until reaped, as PG checks
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {victims} survived SIGKILL")
            time.sleep(0.02)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start/stop across processes (e.g. several hypercorn workers)."""
        fd = os.open(self._side_file("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pid_file_field(self, index: int) -> str | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return lines[index].strip() if len(lines) > index and lines[index].strip() else None

    def _pid_file_port(self) -> int | None:
        port = self._pid_file_field(3)
        return int(port) if port is not None and self.running else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _TIMEOUT_S
        while self._pid_file_field(7) != "ready":
            if not self.running or time.monotonic() > deadline:
                state = "stopped" if not self.running else "is not ready"
                raise RuntimeError(
                    f"PostgreSQL in {self.data_dir} {state}:\n{_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def _choose_port(self) -> int:
        if self._requested_port is not None:
            return self._requested_port
        recorded = self._recorded_port()
        if recorded is not None and _port_is_free(self.host, recorded):
            return recorded
        return _free_port(self.host)

    def _recorded_port(self) -> int | None:
        try:
            match = re.search(r"^port = (\d+)$", (self.data_dir / CONF_NAME).read_text(), re.M)
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def _prepare(self) -> None:
        """Binaries located, data directory present, owned and initialised."""
        initdb = self._bin("initdb")
        assert self._bindir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if fresh and any(self.data_dir.iterdir()):
            raise RuntimeError(f"{self.data_dir} is neither empty nor a PostgreSQL data directory")
        if self._user is not None:
            _grant_traversal(self.data_dir)
            _grant_traversal(self._bindir)
            if not (self._bindir / "postgres").stat().st_mode & stat.S_IXOTH:
                _grant_read_tree(self._bindir.parent)  # e.g. a wheel unpacked under umask 077
            if fresh:
                self._chown(self.data_dir)
        if not fresh:
            return
        self.data_dir.chmod(0o700)
        self._run(
            [
                initdb,
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ],
            "initdb",
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# otelworker.devdb settings\ninclude_if_exists = '{CONF_NAME}'\n")

    def _write_conf(self, port: int) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(port),
            "unix_socket_directories": "''",
            "max_connections": "200",
            "shared_buffers": "'128MB'",
            "fsync": "on",
            "synchronous_commit": "on",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
        }
        path = self.data_dir / CONF_NAME
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _bin(self, name: str) -> str:
        if self._bindir is None:
            self._bindir = find_bindir()
        return str(self._bindir / name)

    def _pg_ctl(self, *args: str) -> None:
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), *args], f"pg_ctl {args[0]}")

    def _run(self, argv: Sequence[str], what: str) -> None:
        # Output to a file, not a pipe: a pipe inherited by the postmaster would never close.
        user = self._user
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    timeout=_TIMEOUT_S + 30,
                    user=user.pw_uid if user else None,
                    group=user.pw_gid if user else None,
                    extra_groups=[] if user else None,
                    check=False,
                )
                failed = proc.returncode != 0
                status = f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed = True
                status = f"no answer within {_TIMEOUT_S + 30} s"
            if failed:
                out.seek(0)
                raise RuntimeError(
                    f"{what} failed for {self.data_dir} ({status}):\n{out.read().strip()}\n"
                    f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
                )
