"""`atelier specialist export NAME --to merged|gguf|ollama|vllm`: ship a specialist where users run models.

    merged   the LoRA adapter merged into its base: safetensors, tokenizer, chat template, model card
    gguf     that merged model as one GGUF file for llama.cpp (f32, f16, q8_0; see gguf_writer.py), and
             for an adapter specialist its LoRA adapter as a GGUF LoRA adapter (gguf_lora.py) beside a
             base GGUF: the original GGUF file when the base was converted from one, else the base
             exported at the same precision. With --serve, registered back as `served_by:
             llamacpp:OUT_DIR`, so llama.cpp in this process serves it (base + adapter, chosen per request)
    ollama   a Modelfile: FROM an Ollama library base + ADAPTER when Ollama knows the base, else FROM
             a GGUF (Llama) or the merged folder, with the chat template translated to Go syntax;
             created in a reachable Ollama server and registered back as `served_by: ollama:NAME`
    vllm     the adapter laid out for `vllm serve --enable-lora --lora-modules`, with SERVE.md

Nothing is written unless the artefact passes a parity check (parity.py): its greedy continuations
of a few held-out prompts must be those of the adapter on its base. Each export is assembled in a
hidden temporary folder and renamed into place at the end, so a failure leaves no half-written output.
Heavy imports (torch, transformers, gguf) happen inside the functions: `atelier --help` stays light.

The modules: pipeline.py runs one export (`export_specialist`) and cli.py is its command; each target
is a module of its own (merged, gguf, ollama, vllm) over common.py (loading the specialist, the
staging folder, what a writer returns); parity.py, model_card.py, gguf_writer.py and gguf_lora.py
are the parts the targets share. Import the module you need: this package re-exports nothing.
"""
