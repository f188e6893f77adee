"""Print horovodrun's `-np N -H host:slots,...` for this job: from SLURM's allocation when inside one,
else from the workflow config (so one rule works on a laptop and on a cluster)."""
import sys

from asrflow.launch import horovod_host_args

print(horovod_host_args(sys.argv[1], sys.argv[2]))
