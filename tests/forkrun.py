"""
Run train.py or sample.py many times, fast, for the tests: one server process imports torch
once (seconds on a small machine) and forks a child per run, which executes the script as
`python script.py ARGS` would, from a clean copy of the server's memory. The server runs
no torch operation itself, so forking it is safe.

    runner = ForkRunner()                 # starts `python forkrun.py`
    result = runner.run(['--max_iters=4', ...], script='train.py', cwd=...)
    result.returncode, result.stdout, result.stderr   # like subprocess.run's
    runner.close()
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/


class ForkRunner:
    def __init__(self):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def run(self, args, script='train.py', cwd=REPO, timeout=240, sigint_after=None, signal_after=None):
        """sigint_after=(path, n): send the run SIGINT (Ctrl-C) once the file at path has n lines;
        signal_after=(path, n, signum): the same with another signal (SIGTERM, SIGKILL)."""
        if sigint_after is not None:
            signal_after = (*sigint_after, signal.SIGINT)
        watch = None if signal_after is None else [str(signal_after[0]), signal_after[1], int(signal_after[2])]
        job = {'script': os.path.join(REPO, script), 'args': [str(a) for a in args], 'cwd': str(cwd),
               'timeout': timeout, 'sigint_after': watch}
        self.server.stdin.write(json.dumps(job) + '\n')
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        result = json.loads(line)
        return subprocess.CompletedProcess(job['args'], result['returncode'], result['stdout'], result['stderr'])

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


def _child(job, out_path, err_path):
    import runpy
    os.chdir(job['cwd'])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for path, fd in ((out_path, 1), (err_path, 2)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    sys.argv = [job['script'], *job['args']]
    # Ctrl-C as in a terminal: a shell that starts the tests in the background (CI, `cmd &`)
    # hands them SIGINT ignored, and Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:
        runpy.run_path(job['script'], run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve():
    # what train.py and sample.py import, imported once here and shared by every child
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: seconds)
    import torch.distributed  # noqa: F401
    import tqdm  # noqa: F401

    sys.path.insert(0, REPO)
    import checkpoint  # noqa: F401
    import dataset  # noqa: F401
    import evals  # noqa: F401
    import faults  # noqa: F401
    import metrics  # noqa: F401
    import model  # noqa: F401
    import system  # noqa: F401

    import time
    assert len(os.listdir('/proc/self/task')) == 1 if os.path.isdir('/proc/self/task') else True, \
        "the fork server must stay single-threaded"
    for line in sys.stdin:
        job = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out_path, err_path = os.path.join(tmp, 'out'), os.path.join(tmp, 'err')
            open(out_path, 'w').close()
            open(err_path, 'w').close()
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(job, out_path, err_path)
            deadline = time.monotonic() + job['timeout']
            watch = job['sigint_after']
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if watch and os.path.exists(watch[0]):
                    with open(watch[0]) as f:
                        if sum(1 for _ in f) >= watch[1]:
                            os.kill(pid, watch[2])
                            watch = None
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            returncode = os.waitstatus_to_exitcode(status)
            with open(out_path) as f_out, open(err_path) as f_err:
                result = {'returncode': returncode, 'stdout': f_out.read(), 'stderr': f_err.read()}
        sys.stdout.write(json.dumps(result) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    serve()
