# The AWS Batch engine's job image (./deploy.sh deploy --engine batch). The job runs the
# bootstrap as `bash -c SCRIPT`, which needs bash, python3 and boto3; without boto3 in the
# image every job would install it first (bootstrap.sh falls back to dnf or pip).
#
# Build and push it to a registry the Batch instances can pull from, then deploy with it:
#   docker build -t ACCOUNT.dkr.ecr.REGION.amazonaws.com/awsfun-worker:1 .
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/awsfun-worker:1
#   ./deploy.sh deploy --engine batch --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/awsfun-worker:1
# The base image below is also deploy's default --image (tests/test_batch.py keeps them equal).
FROM public.ecr.aws/amazonlinux/amazonlinux:2023
RUN dnf install -y python3 python3-boto3 \
    && dnf clean all \
    && rm -rf /var/cache/dnf
