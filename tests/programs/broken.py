"""A worker program that cannot start: its declaration is malformed (a
param given as a number), so the SDK raises TypeError at import (the
end-to-end tests declare it as "broken")."""
from offload_worker import task, serve


@task("broken.sum", description="sums a column", params={"column": 5})
def column_sum(ctx, data, params):
    return data


serve()
