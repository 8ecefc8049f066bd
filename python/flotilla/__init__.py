"""flotilla: drive a flotilla coordinator from Python, over its HTTP API.

    from flotilla import Client
    client = Client("https://10.0.0.1:7070", tls_dir="tls")  # token: $FLOTILLA_TOKEN
    job = client.submit("job.yaml", {"train.optimizer.lr": 1e-3})
    job.wait(progress=True)
    print(job.metrics())
    sweep = client.sweep("sweep.yaml")  # trials run on the coordinator
    print(sweep.wait()["trials"])       # the leaderboard, best first
"""

from .client import Client, FlotillaError, Job, Sweep, set_field

__all__ = ["Client", "FlotillaError", "Job", "Sweep", "set_field"]
__version__ = "0.1.0"
