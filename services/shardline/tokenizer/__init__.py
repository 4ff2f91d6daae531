"""The tokenizer service: tokenize, chat templates and incremental detokenization
(core.py) behind gRPC (servicer.py, server.py). Loads the model's tokenizer through
common.model_source; imports nothing of the worker, models or scheduler.
"""
