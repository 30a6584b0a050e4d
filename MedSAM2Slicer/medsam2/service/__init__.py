"""The engine as a service: ``medsam2 serve`` (FastAPI on uvicorn) runs segmentation jobs for clients.

Why: inside 3D Slicer, PythonQt keeps Python's GIL on the GUI thread, so engine work on a Python thread of
the Slicer process crawls; the engine runs in a process of its own instead, on the same computer (started by
Slicer) or on a GPU server. Modules: :mod:`.wire` (arrays and prompts on the wire, shared with clients),
:mod:`.store` (uploaded arrays and checkpoints, loaded models), :mod:`.jobs` (a queue and a worker per
device), :mod:`.engine` (requests checked and run), :mod:`.app` (HTTP), :mod:`.serve` (the command),
:mod:`.client` (a Python client) and :mod:`.local` (a server started as a child process).
"""
