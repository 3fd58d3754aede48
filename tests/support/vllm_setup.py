"""What the session's real vLLM deployment is started with (its key, chat template and extra flags)."""

from __future__ import annotations

VLLM_KEY = "llm-atc-tests-key"


TEMPLATE_MARKER = "[[llm-atc template]]"


# A chat template of our own: its marker shows in the prompt vLLM renders (see /tokenize).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    + TEMPLATE_MARKER
    + "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


EOS_TOKEN = "Ġnumber"  # one token of the tiny model's tokenizer, made an extra end of generation


RESPONSE_ROLE = "$(touch {marker})"  # a --vllm_args value that vLLM echoes back in every reply
