"""What ``--engine auto`` picks, in one sentence: shown by ``serve --help`` and, word for word, by the serving guide
(a test keeps them together); ``llm_atc.app.serve.choose_engine`` applies it."""

ENGINE_AUTO_RULE = (
    "vLLM on clusters; on this machine vLLM once `llm-atc engines install vllm` has installed it (its CPU build "
    "without a GPU) and it has kernels for the model, else transformers serve, which only generates text"
)
