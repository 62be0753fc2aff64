#include "clients/cpp/dataplane_client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "clients/cpp/bulk_stream.h"

namespace ropekv::client {
namespace {

absl::Status ErrnoStatus(int err, const std::string& what) {
  std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case EEXIST:
      return absl::AlreadyExistsError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case EINVAL:
    case ENAMETOOLONG:
      return absl::InvalidArgumentError(msg);
    case ENOSPC:
    case ENOMEM:
    case EMFILE:
    case ENFILE:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

void SetRange(const BufferRef& r, v1::BufferRange* out) {
  out->set_buffer(r.buffer);
  out->set_offset(r.offset);
  out->set_length(r.length);
  out->mutable_block_ids()->Add(r.block_ids.begin(), r.block_ids.end());
}

v1::GatherToBufferRequest GatherRequest(const std::string& selection_id,
                                        const std::vector<int32_t>& layers, const BufferRef& dst) {
  v1::GatherToBufferRequest req;
  req.set_selection_id(selection_id);
  req.mutable_layers()->Assign(layers.begin(), layers.end());
  SetRange(dst, req.mutable_dst());
  return req;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Create(const std::string& name,
                                                                   uint64_t size) {
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("a shared-memory name is '/' then a name without '/', got \"", name, "\""));
  }
  if (size == 0) return absl::InvalidArgumentError("a shared-memory region of 0 bytes");
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("shm_open(\"", name, "\")"));
  auto fail = [&](const std::string& what) {
    const int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    return ErrnoStatus(err, what);
  };
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    return fail(absl::StrCat("ftruncate of ", name, " to ", size, " bytes"));
  }
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) return fail(absl::StrCat("mmap of ", name));
  return std::unique_ptr<SharedMemory>(
      new SharedMemory(name, fd, static_cast<uint8_t*>(data), size));
}

SharedMemory::~SharedMemory() {
  munmap(data_, size_);
  close(fd_);
  shm_unlink(name_.c_str());
}

absl::StatusOr<std::unique_ptr<DataPlaneClient>> DataPlaneClient::Connect(Client::Options options) {
  if (options.address.empty()) return absl::InvalidArgumentError("empty server address");
  auto channel = MakeChannel(options.address, options.max_message_bytes);
  return std::unique_ptr<DataPlaneClient>(
      new DataPlaneClient(std::move(options), std::move(channel)));
}

DataPlaneClient::DataPlaneClient(Client::Options options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::DataPlane::NewStub(channel_)) {}

void DataPlaneClient::Prepare(grpc::ClientContext* ctx) const {
  SetDeadline(ctx, options_.timeout);
}

absl::StatusOr<v1::BufferInfo> DataPlaneClient::RegisterShm(const std::string& name,
                                                            const std::string& shm_name,
                                                            uint64_t size,
                                                            std::optional<v1::PagedLayout> paged) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::RegisterBufferRequest req;
  req.set_name(name);
  req.mutable_shm()->set_shm_name(shm_name);
  req.mutable_shm()->set_size(size);
  if (paged.has_value()) *req.mutable_paged() = *paged;
  v1::RegisterBufferResponse resp;
  if (auto s = FromGrpc(stub_->RegisterBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp.buffer();
}

absl::StatusOr<v1::BufferInfo> DataPlaneClient::RegisterCudaIpc(
    const std::string& name, int device, const std::string& handle, uint64_t offset, uint64_t size,
    std::optional<v1::PagedLayout> paged) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::RegisterBufferRequest req;
  req.set_name(name);
  v1::CudaIpcRegion* c = req.mutable_cuda_ipc();
  c->set_device(device);
  c->set_handle(handle);
  c->set_offset(offset);
  c->set_size(size);
  if (paged.has_value()) *req.mutable_paged() = *paged;
  v1::RegisterBufferResponse resp;
  if (auto s = FromGrpc(stub_->RegisterBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp.buffer();
}

absl::StatusOr<uint32_t> DataPlaneClient::Unregister(const std::string& name) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::UnregisterBufferRequest req;
  req.set_name(name);
  v1::UnregisterBufferResponse resp;
  if (auto s = FromGrpc(stub_->UnregisterBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp.waited_copies();
}

absl::StatusOr<v1::ListBuffersResponse> DataPlaneClient::ListBuffers() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ListBuffersResponse resp;
  if (auto s = FromGrpc(stub_->ListBuffers(&ctx, v1::ListBuffersRequest(), &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::GetToBufferResponse> DataPlaneClient::GetToBuffer(const GetArgs& args,
                                                                     const BufferRef& dst) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetToBufferRequest req;
  req.set_model(args.model);
  req.set_tenant(args.tenant);
  req.mutable_tokens()->Add(args.tokens.begin(), args.tokens.end());
  req.set_max_blocks(args.max_blocks);
  if (args.target_position.has_value()) req.set_target_position(*args.target_position);
  SetRange(dst, req.mutable_dst());
  v1::GetToBufferResponse resp;
  if (auto s = FromGrpc(stub_->GetToBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::PutFromBufferResponse> DataPlaneClient::PutFromBuffer(const PutArgs& args,
                                                                         const BufferRef& src) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::PutFromBufferRequest req;
  v1::PutHeader* h = req.mutable_header();
  h->set_model(args.model);
  h->set_tenant(args.tenant);
  h->mutable_tokens()->Add(args.tokens.begin(), args.tokens.end());
  h->set_parent(args.parent);
  if (args.rotated_at.has_value()) h->set_rotated_at(*args.rotated_at);
  h->set_pin(args.pin);
  h->set_segment(args.segment);
  SetRange(src, req.mutable_src());
  v1::PutFromBufferResponse resp;
  if (auto s = FromGrpc(stub_->PutFromBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::ComposeToBufferResponse> DataPlaneClient::ComposeToBuffer(
    const std::string& model, const std::string& tenant, const std::vector<v1::ComposePart>& parts,
    const BufferRef& dst) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ComposeToBufferRequest req;
  req.set_model(model);
  req.set_tenant(tenant);
  for (const v1::ComposePart& p : parts) *req.add_parts() = p;
  SetRange(dst, req.mutable_dst());
  v1::ComposeToBufferResponse resp;
  if (auto s = FromGrpc(stub_->ComposeToBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::ReadToBufferResponse> DataPlaneClient::ReadToBuffer(
    const std::string& session_id, std::optional<v1::TokenRange> range,
    std::optional<int64_t> rope_table, const BufferRef& dst,
    std::optional<v1::TokenLayout> layout) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ReadToBufferRequest req;
  req.set_session_id(session_id);
  if (range.has_value()) *req.mutable_range() = *range;
  if (rope_table.has_value()) req.set_rope_table(*rope_table);
  SetRange(dst, req.mutable_dst());
  if (layout.has_value()) *req.mutable_layout() = *layout;
  v1::ReadToBufferResponse resp;
  if (auto s = FromGrpc(stub_->ReadToBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::OpenFromBufferResponse> DataPlaneClient::OpenFromBuffer(
    const v1::OpenSessionHeader& header, const BufferRef& src,
    std::optional<v1::TokenLayout> layout) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::OpenFromBufferRequest req;
  *req.mutable_header() = header;
  SetRange(src, req.mutable_src());
  if (layout.has_value()) *req.mutable_layout() = *layout;
  v1::OpenFromBufferResponse resp;
  if (auto s = FromGrpc(stub_->OpenFromBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::FillFromBufferResponse> DataPlaneClient::FillFromBuffer(
    const v1::FillHeader& header, const BufferRef& src, std::optional<v1::TokenLayout> layout) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::FillFromBufferRequest req;
  *req.mutable_header() = header;
  SetRange(src, req.mutable_src());
  if (layout.has_value()) *req.mutable_layout() = *layout;
  v1::FillFromBufferResponse resp;
  if (auto s = FromGrpc(stub_->FillFromBuffer(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::GatherToBufferResponse> DataPlaneClient::GatherToBuffer(
    const std::string& selection_id, const std::vector<int32_t>& layers, const BufferRef& dst) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GatherToBufferResponse resp;
  if (auto s =
          FromGrpc(stub_->GatherToBuffer(&ctx, GatherRequest(selection_id, layers, dst), &resp));
      !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::GatherBatchToBufferResponse> DataPlaneClient::GatherBatchToBuffer(
    const std::vector<GatherItem>& items) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GatherBatchToBufferRequest req;
  for (const GatherItem& it : items) {
    *req.add_items() = GatherRequest(it.selection_id, it.layers, it.dst);
  }
  v1::GatherBatchToBufferResponse resp;
  if (auto s = FromGrpc(stub_->GatherBatchToBuffer(&ctx, req, &resp)); !s.ok()) return s;
  if (resp.items_size() != req.items_size()) {
    return absl::DataLossError(absl::StrCat("GatherBatchToBuffer: ", req.items_size(),
                                            " items asked, ", resp.items_size(), " answered"));
  }
  return resp;
}

}  // namespace ropekv::client
