"""A worker process that fits arima_plus series for ``mlsql.ml.forecast.fit_many``.

Started as ``python -m mlsql.ml.fit_worker FD``, not by multiprocessing: a spawned multiprocessing
worker re-imports the caller's ``__main__``, so a plain script without an ``if __name__ ==
"__main__":`` guard would run its own statements again in every worker (and fail in multiprocessing's
bootstrapping check). This process imports nothing of the caller's.

Protocol: pickled chunks ``(keys, arrays, cfg)`` on stdin, one pickled list of fits per chunk on the
file descriptor ``FD`` (not stdout, which a library may print to); EOF on stdin ends it.
"""

from __future__ import annotations

import os
import pickle
import sys


def main() -> None:
    from mlsql.ml.forecast import _fit_chunk

    out = os.fdopen(int(sys.argv[1]), "wb")
    inp = sys.stdin.buffer
    while True:
        try:
            task = pickle.load(inp)
        except EOFError:
            return
        pickle.dump(_fit_chunk(task), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    main()
