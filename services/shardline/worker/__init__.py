"""The stage worker service: the runner that turns step plans into backend calls and keeps
per-sequence state (runner.py), building a runner from flags (build.py), the sampler
(sampler.py), the process heap settings (heap.py), the gRPC servicer that chains stages
(servicer.py), the server and its config; tensor parallelism: the ranks a worker starts
(rank_group.py, rank.py) and the wire that gives them every step (step_broadcast.py).

May import protocol, common, models, transforms and backends; never the scheduler, the
tokenizer or the client.
"""
