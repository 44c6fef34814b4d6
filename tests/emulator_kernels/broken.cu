// Does not compile: the emulator's build-error test checks the reported line.
__global__ void broken(float* out) {
    out[threadIdx.x] = undeclared_name;  // line 3
}
