"""Arguments shared by the job commands (submit, status, logs, stop)."""

import os


def add_address(parser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray dashboard address of the cluster (http://HEAD:8265); "
                             "default $RAY_API_SERVER_ADDRESS or the local head")
