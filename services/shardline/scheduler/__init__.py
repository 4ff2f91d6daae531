"""The scheduler service: the public Generate API (servicer.py), requests and their counting
(request.py), KV blocks (block_pool.py under block_manager.py), the batching policy
(scheduler.py) and its admission order (waiting_queue.py), one step loop per pipeline replica (engine.py), routing across replicas by
cached prefix and load (router.py), stop strings on streamed text (stop_strings.py),
discovery of worker pods, the Redis prefix index, and the clients of the tokenizer and of
the stage pipelines.

May import protocol, common and the generated v1 only: never the worker, backends, models or
torch (the scheduler process does not load torch).
"""
