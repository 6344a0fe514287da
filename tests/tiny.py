"""Tiny configurations shared by the tests: small enough for a CPU, large enough to exercise
every feature (recurrence, parallel lanes, XSA, GQA, skips)."""
import os

TINY_ENV = dict(
    NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", VOCAB_SIZE="256",
    LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_START="3", XSA_LAST_N="4",
    ROPE_DIMS="8", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32",
)


def tiny_hparams(monkeypatch=None, **overrides):
    """Hyperparameters() under the tiny env (plus overrides), via monkeypatch when given."""
    import train_gpt

    env = {**TINY_ENV, **{k: str(v) for k, v in overrides.items()}}
    if monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return train_gpt.Hyperparameters()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return train_gpt.Hyperparameters()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
