"""MQTT 5 transport: the only package that knows paho-mqtt exists.

    client.py   MqttClient (the one module that imports paho), broker URLs, credentials
    loop.py     the client's network I/O on an asyncio loop
    props.py    a fast codec for PUBLISH properties (no paho)
    types.py    BrokerURL, TlsFiles, Will, Message, PublishProps: free of paho
    topics.py   every topic name of the project, and where an offload answer may go
    auth.py     broker credentials from options and the environment (never argv)

May import: errors. Message payloads are not here: offload/messages.py and
fleet/messages.py own theirs.
"""
