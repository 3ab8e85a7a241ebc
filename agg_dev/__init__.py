"""What the pack's tools (scripts/) and its tests share, outside the nodes: where the set-up's ComfyUI lives
(comfy_env), API-prompt building (graphs), the model files the example workflows name (workflow_models) and a
headless-Chromium WebDriver client for the ComfyUI page (browser).

Nothing here imports ComfyUI, torch or the tests; the nodes never import it.
"""
