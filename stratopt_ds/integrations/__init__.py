"""The framework glue: DeepSpeed (``deepspeed``), the HF Trainer (``hf``, ``hf_callback``) and
accelerate (``accelerate``). Nothing is imported here: each module imports its framework only
when used. ``stratopt_ds.deepspeed`` stays an alias of ``stratopt_ds.integrations.deepspeed``,
so that ``stratopt_ds.deepspeed.initialize`` reads like ``deepspeed.initialize``."""
