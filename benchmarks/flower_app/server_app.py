"""ServerApp: wait for every SuperNode, then run FedAvg (train only, no evaluation) and time each round
from ``configure_train`` (the round starts: the global arrays go out) to the end of
``aggregate_train`` (every reply is in and averaged)."""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.starts: list[float] = []
        self.ends: list[float] = []

    def configure_train(self, *args, **kw):
        self.starts.append(time.perf_counter())
        return super().configure_train(*args, **kw)

    def aggregate_train(self, *args, **kw):
        out = super().aggregate_train(*args, **kw)
        self.ends.append(time.perf_counter())
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, rounds = int(cfg["num-clients"]), int(cfg["rounds"])
    with np.load(str(cfg["payload"])) as z:
        arrays = ArrayRecord([z[k] for k in sorted(z.files)])
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {n} SuperNodes connected")
        time.sleep(0.2)
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    total = sum(a.numpy().nbytes for a in result.arrays.values())
    rounds_s = [e - s for s, e in zip(strategy.starts, strategy.ends, strict=True)]
    with open(str(cfg["out"]), "w") as f:
        json.dump({"rounds_s": rounds_s, "clients": n, "payload_bytes": int(total)}, f)
