"""Getting data into the workflow: corpus importers (``importers``) and DEMAND noise (``demand``).

Submodules are not imported here so that ``import asrflow.data`` stays cheap and free of side effects;
import ``asrflow.data.demand`` or ``asrflow.data.importers`` directly.
"""
