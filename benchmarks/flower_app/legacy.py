"""Flower's persistent-client path, run in Flower's own environment (``benchmarks/flower.py``).

``legacy.py server PORT N ROUNDS PAYLOAD OUT``: ``flwr.server.start_server`` with a FedAvg (fit only,
no evaluation) that waits for N clients and times each round from ``configure_fit`` (the global
arrays go out) to the end of ``aggregate_fit`` (every reply is in and averaged); writes OUT.
``legacy.py client PORT``: one ``NumPyClient`` whose fit returns the arrays it received, weighted by
10 examples, connected with ``flwr.client.start_client`` over the same gRPC stream for the whole run
(no process per round, no polling): the fastest configuration Flower 1.39 offers.
"""

import json
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")  # both entry points are deprecated in 1.39 and say so at length


def server(port: int, n: int, rounds: int, payload: str, out: str) -> None:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    with np.load(payload) as z:
        arrays = [z[k] for k in sorted(z.files)]

    class TimedFedAvg(FedAvg):
        starts: list[float] = []
        ends: list[float] = []
        payload_bytes = 0

        def configure_fit(self, server_round, parameters, client_manager):
            self.starts.append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            res = super().aggregate_fit(server_round, results, failures)
            self.ends.append(time.perf_counter())
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed")
            self.payload_bytes = int(sum(a.nbytes for a in parameters_to_ndarrays(res[0])))
            return res

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(arrays),
    )
    start_server(server_address=f"127.0.0.1:{port}", config=ServerConfig(num_rounds=rounds), strategy=strategy)
    rounds_s = [e - s for s, e in zip(strategy.starts, strategy.ends, strict=True)]
    with open(out, "w") as f:
        json.dump({"rounds_s": rounds_s, "clients": n, "payload_bytes": strategy.payload_bytes}, f)


def client(port: int) -> None:
    from flwr.client import NumPyClient, start_client

    class Echo(NumPyClient):
        def fit(self, parameters, config):
            return parameters, 10, {}

    start_client(server_address=f"127.0.0.1:{port}", client=Echo().to_client(), insecure=True, transport="grpc-bidi")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        client(int(sys.argv[2]))
