"""Real-cluster test harness for SpanTrain: etcd + kube-apiserver + KCM + kube-scheduler + KWOK.

Role: test infrastructure only (see ``controlplane.py``, ``fixtures.py`` and ``README.md``).
Must not import: the SpanTrain code under test (``spantrain_planner``, ``spantrain_worker``,
``spantrain_operator``), kopf, torch -- the harness has to stay
usable for testing any operator build, and importable without the heavy runtime dependencies.
"""
