"""Scale-out on Ray Serve: engine replicas behind a ``DeploymentHandle``, routed by prompt prefix.

The modules without ``ray`` in their imports (``wire``, ``prefix_routing``, ``replica``, ``handle_generator``) hold
the logic and are tested without a Ray cluster; ``serve_client``, ``router`` and ``deployments`` bind it to Ray.
"""
