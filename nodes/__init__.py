"""ComfyUI glue: loader nodes, the attention node, server routes and quantized-tensor layouts."""
