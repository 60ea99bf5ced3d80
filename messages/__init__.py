"""What crosses pdserve's internal gRPC boundaries, typed, and the only proto ↔ dataclass
conversions for them.

One module of frozen dataclasses and one conversion module per boundary; the servicer
and the client of a boundary both use that conversion module, so the two sides cannot
drift apart:

=====================================  ===========================  =======================
boundary                               messages                     conversion
=====================================  ===========================  =======================
router → decode worker (``Decode``)    :mod:`messages.decode`       :mod:`~.decode_proto`
decode → prefill worker (``Prefill``)  :mod:`messages.prefill`      :mod:`~.prefill_proto`
anyone → worker (``GetStatus``)        :mod:`messages.status`       :mod:`~.status_proto`
sampling parameters (both RPCs)        :mod:`common.sampling`       :mod:`~.sampling_proto`
request errors → gRPC status codes     :mod:`common.errors`         :mod:`~.grpc_status`
=====================================  ===========================  =======================

Torch-free: imports :mod:`common` and :mod:`proto` only (the client → router boundary is
the public API, converted in :mod:`router.api_proto`).
"""
