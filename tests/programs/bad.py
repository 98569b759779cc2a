"""A worker program that declares a task outside its namespace: the front
refuses it at the handshake (the end-to-end tests declare it as "bad")."""
from offload_worker import task, serve


@task("other.x", description="not in program bad's namespace")
def x(ctx, data, params):
    return data


serve()
