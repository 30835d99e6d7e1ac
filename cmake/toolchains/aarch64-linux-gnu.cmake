# Cross build for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu; Python
# headers for aarch64 from libpython3.X-dev:arm64 (.ci/portability_check).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
